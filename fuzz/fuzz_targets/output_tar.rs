//! `capsid run --output`'s unpacker on any tar stream a guest could send:
//! `..`, absolute paths, links out directly or through each other, hard
//! links, devices, set-id bits, huge headers. Nothing may be written
//! outside: a file beside the destination stays as it was, and the
//! directory holds only it and, if the stream was accepted whole, the
//! destination — never a partial directory.
#![no_main]

use capsid_images::output::{Limits, unpack};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let sentinel = dir.path().join("sentinel");
    std::fs::write(&sentinel, b"host").unwrap();
    let limits = Limits {
        bytes: 1 << 20,
        entries: 1000,
    };
    let accepted = unpack(data, &dir.path().join("out"), limits).is_ok();
    assert_eq!(
        std::fs::read(&sentinel).unwrap(),
        b"host",
        "an output wrote outside"
    );
    let mut beside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    beside.sort();
    let want: &[&str] = if accepted {
        &["out", "sentinel"]
    } else {
        &["sentinel"]
    };
    assert_eq!(beside, want, "an output left something beside");
});
