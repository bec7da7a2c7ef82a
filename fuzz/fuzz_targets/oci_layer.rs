//! The OCI layer unpacker on any tar stream: `..`, absolute paths, links
//! and symlinks out, whiteouts of what is outside, devices, huge headers.
//! Nothing may be written outside the tree: a file beside it must stay as
//! it was, and the tree's parent must hold nothing else.
#![no_main]

use capsid_images::oci::unpack_layer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let sentinel = dir.path().join("sentinel");
    std::fs::write(&sentinel, b"host").unwrap();
    let _ = unpack_layer(data, &root);
    assert_eq!(
        std::fs::read(&sentinel).unwrap(),
        b"host",
        "a layer wrote outside"
    );
    let mut beside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    beside.sort();
    assert_eq!(
        beside,
        ["root", "sentinel"],
        "a layer made something outside"
    );
});
