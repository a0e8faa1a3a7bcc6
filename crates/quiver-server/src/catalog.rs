//! What the server can serve, by the names requests use: the base model,
//! every expert of every library, and every route over a library; and how
//! a request's `model` and route fields resolve to an engine [`Target`].
//!
//! The libraries' listings are re-read on `GET /v1/models`, on `POST
//! /v1/reload`, and when a request names something the last listing did
//! not have, so an expert imported while the server runs can be requested
//! without a restart. Only published experts are listed (a library writes
//! an expert's files before its manifest), and every load checks the
//! files against the manifest, so a half-written or corrupt expert is
//! never served.

use std::hash::{Hash, Hasher};
use std::sync::{Arc, RwLock};

use quiver_core::library::ExpertLibrary;
use quiver_core::routing::{MixMode, Route, RouteSpec};

use crate::api::{self, ApiError};
use crate::engine::Target;
use crate::explain::{self, ExplainMode};

/// The routes `/v1/models` lists for each library.
pub const ROUTES: [&str; 6] = ["arrow", "uniform", "uniform-dw", "ties", "mu", "phatgoose"];

/// One library's last listing.
#[derive(Debug, Clone)]
struct Listing {
    name: String,
    experts: Vec<String>,
    /// Changes whenever the listed experts do.
    version: u64,
}

/// The served names.
pub struct Catalog {
    model_id: String,
    /// The libraries, shared with the model thread, for listing.
    libraries: Vec<Arc<ExpertLibrary>>,
    listings: RwLock<Vec<Listing>>,
    /// Serve experts whose recorded base model differs from the model's.
    allow_base_mismatch: bool,
}

impl Catalog {
    /// Lists every library once.
    pub fn new(
        model_id: String,
        libraries: Vec<(String, Arc<ExpertLibrary>)>,
        allow_base_mismatch: bool,
    ) -> quiver_core::Result<Self> {
        let mut listings = Vec::new();
        let mut handles = Vec::new();
        for (name, lib) in libraries {
            listings.push(list(&name, &lib)?);
            handles.push(lib);
        }
        Ok(Self {
            model_id,
            libraries: handles,
            listings: RwLock::new(listings),
            allow_base_mismatch,
        })
    }

    /// Reads every library's listing again (blocking: call it off the
    /// async workers); a library that cannot be read keeps its last one.
    pub fn reload(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let old = self.listings.read().expect("listings").clone();
        let fresh: Vec<Listing> = old
            .into_iter()
            .zip(&self.libraries)
            .map(|(l, lib)| match list(&l.name, lib) {
                Ok(n) => n,
                Err(e) => {
                    problems.push(format!("library `{}`: {e}", l.name));
                    l
                }
            })
            .collect();
        *self.listings.write().expect("listings") = fresh;
        problems
    }

    /// Every name a request's `model` may use.
    pub fn model_ids(&self) -> Vec<String> {
        let listings = self.listings.read().expect("listings");
        let mut ids = vec![self.model_id.clone(), "base".to_string()];
        let several = listings.len() > 1;
        for l in listings.iter() {
            let p = if several {
                format!("{}:", l.name)
            } else {
                String::new()
            };
            ids.extend(l.experts.iter().map(|e| format!("{p}{e}")));
            ids.extend(ROUTES.iter().map(|r| format!("{p}{r}")));
        }
        ids
    }

    /// The target of a request.
    pub fn resolve(&self, c: &api::Common) -> Result<Target, ApiError> {
        let (library, mut route, version) = self.resolve_model(&c.model)?;
        if let Some(r) = &c.route {
            route = r
                .parse()
                .map_err(|e: quiver_core::Error| ApiError::bad(e.to_string(), Some("route")))?;
        }
        let mut spec = RouteSpec::new(route);
        spec.allow_base_mismatch = self.allow_base_mismatch;
        spec.options.top_k = c.top_k;
        spec.options.temperature = c.router_temperature;
        if let Some(m) = &c.mix {
            spec.options.mix = m
                .parse::<MixMode>()
                .map_err(|e| ApiError::bad(e.to_string(), Some("mix")))?;
        }
        spec.validate()
            .map_err(|e| ApiError::bad(e.to_string(), None))?;
        if matches!(spec.route, Route::Oracle(_)) {
            return Err(ApiError::bad(
                "the oracle route needs each item's task, which a request does not have",
                Some("route"),
            ));
        }
        let library = if spec.route == Route::Base {
            None
        } else {
            library
        };
        if spec.route != Route::Base && library.is_none() {
            return Err(ApiError::bad(
                format!(
                    "route `{}` needs a library; the server was started without --library",
                    spec.route
                ),
                Some("model"),
            ));
        }
        if explain::mode(c)?.is_some_and(|_: ExplainMode| spec.route.selector_kind().is_none()) {
            return Err(ApiError::bad(
                format!("quiver_explain shows per-token routing; route `{}` is the same for every token (use arrow, mu or phatgoose)", spec.route),
                Some("quiver_explain"),
            ));
        }
        Ok(Target {
            library,
            spec,
            version: if library.is_some() { version } else { 0 },
        })
    }

    /// `model` as (library, route, the library's listing version).
    fn resolve_model(&self, model: &str) -> Result<(Option<usize>, Route, u64), ApiError> {
        let listings = self.listings.read().expect("listings");
        let (lib, name) = match model.split_once(':') {
            Some((l, rest)) if listings.iter().any(|x| x.name == l) => {
                (listings.iter().position(|x| x.name == l), rest)
            }
            _ => ((!listings.is_empty()).then_some(0), model),
        };
        let version = lib.map_or(0, |i| listings[i].version);
        if model == "base" || model == self.model_id {
            return Ok((lib, Route::Base, version));
        }
        let Some(i) = lib else {
            return Err(ApiError::no_model(model));
        };
        if listings[i].experts.iter().any(|e| e == name) {
            return Ok((lib, Route::Expert(name.to_string()), version));
        }
        match name.parse::<Route>() {
            // An expert name the listing does not have parses as an
            // expert route: not a route this library serves.
            Ok(Route::Expert(_)) | Err(_) => Err(ApiError::no_model(model)),
            Ok(r) => Ok((lib, r, version)),
        }
    }
}

fn list(name: &str, lib: &ExpertLibrary) -> quiver_core::Result<Listing> {
    let entries = lib.list().map_err(quiver_core::Error::from)?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for e in &entries {
        (&e.name, e.created, e.size).hash(&mut h);
    }
    Ok(Listing {
        name: name.to_string(),
        experts: entries.into_iter().map(|e| e.name).collect(),
        version: h.finish(),
    })
}
