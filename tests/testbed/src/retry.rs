//! Guests that crash at boot in tests: the nested test host's guests die
//! now and then before their kernel runs `/init`, QEMU's as well as ours
//! (docs/reliability.md, `make deaths`). A test boots such a guest once
//! more, loudly; a second crash fails it.

/// How many times a test boots one guest whose kernel crashed before it
/// booted: twice. The nested test host's guests die now and then at boot,
/// QEMU's as often as ours (docs/reliability.md, `make deaths`); a second
/// crash fails the test.
pub const BOOTS_PER_GUEST: usize = 2;

/// What each boot again prints first, on a line of its own; the test
/// command counts these lines.
pub const BOOT_RETRY_TAG: &str = "E2E-BOOT-RETRY";

/// Says, loudly, that `what`'s guest crashed before it booted and is booted
/// again, with what its VMM left (`why`).
pub fn announce_boot_retry(what: &str, why: &str) {
    eprintln!(
        "{BOOT_RETRY_TAG} {what}: the guest crashed before it booted; booting it again \
         (docs/reliability.md). What the crashed one left:\n{why}"
    );
}
