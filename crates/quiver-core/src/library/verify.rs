//! Checking and copying a whole library: `verify` re-hashes every file of
//! every expert (and checks each manifest's own seal when it is parsed);
//! `copy_to` moves experts and auxiliary data between libraries, local or
//! S3, checking each expert on the way.

use candle_core::{DType, Device};

use super::error::{short, LibraryResult};
use super::manifest::{ExpertManifest, FileDigest};
use super::{
    digest_mismatch, invalid, CopyReport, ExpertLibrary, Problem, Progress, VerifyReport, AUX_DIR,
    BASE_MODEL_FILE, LIBRARY_FILE, MANIFEST, VERIFY_BATCH,
};
use crate::expert::Expert;

impl ExpertLibrary {
    /// Re-hashes every file of every expert; see [`VerifyReport`].
    pub fn verify(&self) -> LibraryResult<VerifyReport> {
        self.verify_with(&mut |_, _, _| {})
    }

    /// [`ExpertLibrary::verify`], reporting progress in files.
    pub fn verify_with(&self, progress: Progress) -> LibraryResult<VerifyReport> {
        let mut report = VerifyReport {
            library: self.uri().into(),
            ..Default::default()
        };
        let problem = |expert: Option<&str>, location: String, what: String| Problem {
            expert: expert.map(str::to_string),
            location,
            what,
        };
        let mut library_base = None;
        if let Err(e) = self.read_meta() {
            report.problems.push(problem(
                None,
                self.storage.display(LIBRARY_FILE),
                e.to_string(),
            ));
        }
        match self.base_model() {
            Ok(b) => library_base = b,
            Err(e) => report.problems.push(problem(
                None,
                self.storage.display(BASE_MODEL_FILE),
                e.to_string(),
            )),
        }
        let dirs = self.storage.experts()?;
        report.experts = dirs.len();
        // (expert, key, recorded digest) of every file to re-hash.
        let mut todo: Vec<(String, String, FileDigest)> = Vec::new();
        let manifest_keys: Vec<String> = dirs
            .iter()
            .filter(|d| d.sealed)
            .map(|d| format!("{}/{MANIFEST}", d.name))
            .collect();
        let mut manifests = self.storage.get_many(&manifest_keys)?.into_iter();
        for d in &dirs {
            if !d.sealed {
                let dir = self
                    .root()
                    .expect("only local experts lack manifests")
                    .join(&d.name);
                match Expert::load(&dir, &Device::Cpu, DType::F32) {
                    Ok(_) => report.notes.push(format!(
                        "{}: no {MANIFEST} (written before libraries had manifests); loads, but its files are not hash-checked",
                        dir.display()
                    )),
                    Err(e) => report.problems.push(problem(
                        Some(&d.name),
                        dir.display().to_string(),
                        format!("does not load: {e}"),
                    )),
                }
                continue;
            }
            let key = format!("{}/{MANIFEST}", d.name);
            let location = self.storage.display(&key);
            let Some(bytes) = manifests.next().expect("one per sealed expert") else {
                report.experts -= 1; // removed while we verified
                continue;
            };
            let m = match ExpertManifest::parse(&bytes, &location) {
                Ok(m) => m,
                Err(e) => {
                    report
                        .problems
                        .push(problem(Some(&d.name), location, e.to_string()));
                    continue;
                }
            };
            if m.name != d.name {
                report.problems.push(problem(
                    Some(&d.name),
                    location.clone(),
                    format!("the manifest names expert `{}`", m.name),
                ));
            }
            if let (Some(eb), Some(lb)) = (&m.base_model, &library_base) {
                if eb.fingerprint != lb.fingerprint {
                    report.problems.push(problem(
                        Some(&d.name),
                        location.clone(),
                        format!(
                            "trained on base model `{}` (fingerprint {}), but the library's is `{}` (fingerprint {})",
                            eb.id,
                            short(&eb.fingerprint),
                            lb.id,
                            short(&lb.fingerprint)
                        ),
                    ));
                }
            }
            for (file, digest) in m.files {
                todo.push((d.name.clone(), format!("{}/{file}", d.name), digest));
            }
        }
        let total = todo.len();
        for (i, chunk) in todo.chunks(VERIFY_BATCH).enumerate() {
            progress(i * VERIFY_BATCH, total, &chunk[0].0);
            let keys: Vec<String> = chunk.iter().map(|(_, k, _)| k.clone()).collect();
            for ((expert, key, digest), bytes) in chunk.iter().zip(self.storage.get_many(&keys)?) {
                report.files += 1;
                let what = match bytes {
                    None => Some("missing".to_string()),
                    Some(b) => digest_mismatch(digest, &b).map(|w| format!("corrupt: {w}")),
                };
                if let Some(what) = what {
                    report
                        .problems
                        .push(problem(Some(expert), self.storage.display(key), what));
                }
            }
        }
        progress(total, total, "");
        // Files that hash right can still disagree with the manifest (an
        // old manifest without a seal, edited) or hold NaNs: load each.
        for d in dirs.iter().filter(|d| d.sealed) {
            if report
                .problems
                .iter()
                .any(|p| p.expert.as_deref() == Some(&d.name))
            {
                continue;
            }
            if let Err(e) = self.load_expert(&d.name, &Device::Cpu, DType::F32) {
                report.problems.push(problem(
                    Some(&d.name),
                    self.storage.display(&format!("{}/{MANIFEST}", d.name)),
                    e.to_string(),
                ));
            }
        }
        report.notes.extend(self.storage.leftovers()?);
        Ok(report)
    }

    /// Copies every expert (checked on the way) and the auxiliary data
    /// into `dst`, e.g. from a local directory to S3. Experts `dst` has
    /// already are skipped when identical and reported as conflicts when not.
    pub fn copy_to(&self, dst: &ExpertLibrary) -> LibraryResult<CopyReport> {
        self.copy_to_with(dst, &mut |_, _, _| {})
    }

    /// [`ExpertLibrary::copy_to`], reporting progress in experts.
    pub fn copy_to_with(
        &self,
        dst: &ExpertLibrary,
        progress: Progress,
    ) -> LibraryResult<CopyReport> {
        if self.uri() == dst.uri() {
            return Err(invalid(format!(
                "cannot copy library {} onto itself",
                self.uri()
            )));
        }
        if let Some(base) = self.base_model()? {
            dst.set_base_model(&base)?;
        }
        let mut report = CopyReport::default();
        let manifests = self.manifests()?;
        let total = manifests.len();
        for (i, (m, _)) in manifests.into_iter().enumerate() {
            progress(i, total, &m.name);
            let name = m.name.clone();
            if let Some((theirs, _)) = dst.read_manifest(&name)? {
                if theirs.files == m.files {
                    report.skipped.push(name);
                } else {
                    report.conflicts.push(name);
                }
                continue;
            }
            let (m, files) = self.read_files(&name)?;
            dst.add_record(m, files)?;
            report.copied.push(name);
        }
        progress(total, total, "");
        for e in self.storage.list(&format!("{AUX_DIR}/"))? {
            if let Some(bytes) = self.storage.get(&e.key)? {
                if dst.storage.put_new(&e.key, &bytes)? {
                    report.aux_copied += 1;
                }
            }
        }
        Ok(report)
    }
}
