//! Where a job's input comes from: a `file://` path on this machine or a key in the store,
//! and only from under `store.allowed_inputs`.

use std::path::Path;

use rowsmith_bus::step::StepError;
use rowsmith_store::{StorageError, Store};

/// Resolves a job's input to a local file: `file://` paths as they are, store keys through
/// the store.
pub async fn local_input(
    store: &Store,
    input: &str,
    allowed: &[String],
    scratch: &Path,
) -> Result<std::path::PathBuf, StepError> {
    check_input_allowed(input, allowed)?;
    if let Some(path) = input.strip_prefix("file://") {
        let path = std::path::PathBuf::from(path);
        if !path.is_file() {
            return Err(StepError::Job(format!(
                "input {input} does not exist or is not a file"
            )));
        }
        return Ok(path);
    }
    if input.contains("://") {
        return Err(StepError::Job(format!(
            "input {input:?} is not supported: give file:///path or a key in the store (inputs/…)"
        )));
    }
    match store.fetch_local(input, scratch).await {
        Err(StorageError::NotFound { .. }) => Err(StepError::Job(format!(
            "input {input:?} is not in the store; upload it first (rowsmith submit does)"
        ))),
        other => Ok(other?),
    }
}

/// Refuses an input outside `store.allowed_inputs` (or one that climbs out with `..`)
/// before anything is read.
pub fn check_input_allowed(input: &str, allowed: &[String]) -> Result<(), StepError> {
    let climbs = input.split(['/', '\\']).any(|segment| segment == "..");
    if !climbs
        && allowed
            .iter()
            .any(|prefix| !prefix.is_empty() && input.starts_with(prefix.as_str()))
    {
        return Ok(());
    }
    Err(StepError::Job(format!(
        "input {input:?} is not allowed: inputs must be under one of {} (store.allowed_inputs); \
         submit a local file with `rowsmith submit`, which uploads it, or allow its directory",
        allowed.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_outside_the_allow_list_or_climbing_out_are_refused() {
        let allowed = vec!["inputs/".to_owned(), "file:///data/".to_owned()];
        assert!(check_input_allowed("inputs/job-1/products.csv", &allowed).is_ok());
        assert!(check_input_allowed("file:///data/products.csv", &allowed).is_ok());
        for refused in [
            "file:///etc/passwd",
            "jobs/other/input.indexed.parquet",
            "file:///data/../etc/passwd",
            "inputs/../jobs/x",
        ] {
            let error = check_input_allowed(refused, &allowed)
                .unwrap_err()
                .to_string();
            assert!(error.contains("store.allowed_inputs"), "{refused}: {error}");
        }
    }
}
