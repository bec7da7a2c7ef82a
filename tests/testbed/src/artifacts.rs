//! What the project's scripts built for the tests (`scripts/artifacts.sh`
//! exports each path in a `CAPSID_*` variable), and initramfs images made
//! from them.

use std::path::{Path, PathBuf};

use crate::initramfs::Initramfs;

/// A file the test needs, named by an environment variable set by `make test`.
pub fn artifact(variable: &str) -> PathBuf {
    let path = std::env::var_os(variable).unwrap_or_else(|| {
        panic!("{variable} is not set: run the tests with `make test`, which builds it")
    });
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "{variable}={} does not exist; rebuild with `make test`",
        path.display()
    );
    path
}

/// Writes an initramfs whose `/init` is `init` (a static program).
pub fn initramfs_with_init(init: &Path, out: &Path) -> PathBuf {
    let mut archive = Initramfs::create(out).expect("create initramfs");
    archive.file("/init", init).expect("add /init");
    archive
        .char_device("/dev/console", 5, 1, 0o600)
        .expect("add /dev/console");
    archive.dir("/proc").expect("add /proc");
    archive.finish().expect("write initramfs");
    out.to_owned()
}
