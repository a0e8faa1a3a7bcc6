//! The command lines of the experiment's child `quiver` processes: where
//! each library lives and the `quiver eval` arguments of each route.

use std::path::Path;

use quiver_core::library::ExpertLibrary;

use super::config::{ExperimentConfig, Lib, RowKind};

/// The source the training tasks come from (`quiver eval --data`): held-out
/// siblings and library tasks are evaluated from it too, split by the same
/// seeded shuffle as training, so test items are never training items.
pub fn train_data(cfg: &ExperimentConfig) -> Option<String> {
    Some(cfg.train.source.clone())
}

/// Where library `lib` of the experiment lives: `[library] root` (a
/// directory or `s3://bucket/prefix`) or the output directory.
pub fn lib_uri(cfg: &ExperimentConfig, out: &Path, lib: Lib) -> String {
    match &cfg.library.root {
        Some(root) => format!("{}/{}", root.trim_end_matches('/'), lib.dir()),
        None => out.join(lib.dir()).display().to_string(),
    }
}

/// Experts in a library (0 when it does not exist yet).
pub fn library_size(uri: &str) -> usize {
    ExpertLibrary::open(uri)
        .and_then(|l| l.list())
        .map(|l| l.len())
        .unwrap_or(0)
}

/// `quiver eval` arguments of a plain route (model, route, library, top-k).
pub fn route_args(cfg: &ExperimentConfig, out: &Path, spec: &RowKind) -> Vec<String> {
    let RowKind::Plain {
        route,
        lib,
        top_k,
        gks,
    } = spec
    else {
        unreachable!("oracle rows are evaluated per task");
    };
    let mut args = vec![
        "eval".to_string(),
        "--model".into(),
        cfg.model.clone(),
        "--route".into(),
        route.to_string(),
    ];
    if let Some(lib) = lib {
        let uri = lib_uri(cfg, out, *lib);
        let kind = route.selector_kind();
        let size = library_size(&uri).saturating_sub(usize::from(*gks));
        args.extend(["--library".into(), uri]);
        if kind.is_some() && size > 0 {
            let k = top_k.unwrap_or(cfg.eval.top_k).min(size);
            args.extend(["--top-k".into(), k.to_string()]);
        }
        if *gks {
            args.extend(["--gks".into(), "shared".into()]);
        }
        if matches!(
            kind,
            Some(quiver_core::routing::SelectorKind::Mu)
                | Some(quiver_core::routing::SelectorKind::Phatgoose)
        ) {
            args.extend(["--route-data".into(), cfg.train.source.clone()]);
        }
    }
    args
}

pub fn expert_args(cfg: &ExperimentConfig, out: &Path, lib: Lib, expert: &str) -> Vec<String> {
    vec![
        "eval".to_string(),
        "--model".into(),
        cfg.model.clone(),
        "--route".into(),
        format!("expert:{expert}"),
        "--library".into(),
        lib_uri(cfg, out, lib),
    ]
}
