//! Replays the fuzz corpus (`fuzz/corpus/<target>/`) and every crash kept as a regression
//! input (`fuzz/regressions/<target>/`) through the same entry points the fuzz targets call,
//! so CI checks them on stable Rust without libFuzzer.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use vfio_user_proto::fuzzing;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

/// Runs `f` on every corpus and regression input of `target`; fails naming each input that
/// panics. The corpus must not be empty, so this cannot pass by finding nothing.
fn replay(target: &str, f: fn(&[u8])) {
    let corpus = files(&fuzz_dir().join("corpus").join(target));
    assert!(
        !corpus.is_empty(),
        "fuzz/corpus/{target} is missing or empty"
    );
    let regressions = files(&fuzz_dir().join("regressions").join(target));
    let mut failed = Vec::new();
    for path in corpus.iter().chain(&regressions) {
        let data = fs::read(path).expect("readable corpus file");
        if catch_unwind(AssertUnwindSafe(|| f(&data))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: inputs that panic: {failed:#?}"
    );
}

#[test]
fn framing() {
    replay("framing", fuzzing::framing);
}

#[test]
fn capabilities() {
    replay("capabilities", fuzzing::capabilities);
}

#[test]
fn version_reply() {
    replay("version_reply", fuzzing::version_reply);
}

#[test]
fn header() {
    replay("header", fuzzing::header);
}

#[test]
fn limits() {
    replay("limits", fuzzing::limits);
}

#[test]
fn command_replies() {
    replay("command_replies", fuzzing::command_replies);
}
