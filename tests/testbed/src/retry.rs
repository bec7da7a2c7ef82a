//! Guests that die at boot in tests: the nested test host's guests die
//! now and then before their kernel runs `/init` — a triple fault, or a
//! hang with no word from the kernel — QEMU's as well as ours
//! (docs/reliability.md, `make deaths`). A test boots such a guest once
//! more, loudly; a second death fails it.

/// How many times a test boots one guest whose kernel died (crashed or
/// hung) before it booted: twice. The nested test host's guests die now
/// and then at boot, QEMU's too (docs/reliability.md, `make deaths`); a
/// second death fails the test.
pub const BOOTS_PER_GUEST: usize = 2;

/// What each boot again prints first, on a line of its own; the test
/// command counts these lines.
pub const BOOT_RETRY_TAG: &str = "E2E-BOOT-RETRY";

/// Says, loudly, that `what`'s guest died before it booted and is booted
/// again, with what its VMM left (`why`).
pub fn announce_boot_retry(what: &str, why: &str) {
    eprintln!(
        "{BOOT_RETRY_TAG} {what}: the guest died before it booted; booting it again \
         (docs/reliability.md). What the dead one left:\n{why}"
    );
}
