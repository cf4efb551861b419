//! The Debian package, as an administrator meets it: built from the
//! workspace, checked by lintian (no errors, no warnings), installed with
//! apt on a real Debian 12 booted with systemd (systemd-nspawn), set up by
//! running README.Debian's recipe as written (a global server, two homes,
//! two people with agents as user services), reloaded with a good and a bad
//! config, failed on purpose, upgraded, removed and purged. The steps live
//! in `tests/install/nspawn.sh`; this test runs it and says "skipped" where
//! it cannot (not root, no nspawn or debootstrap).

// Test code: an unwrap that fails is the test failing (as clippy.toml
// allows in #[test] functions, here for their helpers too).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use popupd_e2e::{have, is_root, skip};

#[test]
fn package_installs_runs_reloads_and_purges_on_real_systemd() {
    const NAME: &str = "package_installs_runs_reloads_and_purges_on_real_systemd";
    if !is_root() {
        return skip(NAME, "needs root to boot a container (CI runs it as root)");
    }
    for tool in ["systemd-nspawn", "debootstrap", "nsenter", "dpkg-deb"] {
        if !have(tool) {
            return skip(
                NAME,
                &format!("`{tool}` is not installed (apt install systemd-container debootstrap)"),
            );
        }
    }
    let top = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // Package the binaries this test run already built (no nested cargo).
    let profile = popupd_e2e::bin("popupd")
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "debug".into());
    let out = Command::new(top.join("packaging/build-deb.sh"))
        .env("SKIP_BUILD", "1")
        .env("PROFILE", &profile)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "build-deb.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = top.join(String::from_utf8_lossy(&out.stdout).trim());
    assert!(deb.exists(), "{} was not made", deb.display());

    if have("lintian") {
        let l = Command::new("lintian").arg(&deb).output().unwrap();
        let report = String::from_utf8_lossy(&l.stdout);
        println!("lintian:\n{report}");
        assert!(
            !report
                .lines()
                .any(|l| l.starts_with("E:") || l.starts_with("W:")),
            "lintian reports errors or warnings:\n{report}"
        );
    } else {
        println!("lintian not installed; package not linted");
    }

    let run = Command::new(top.join("tests/install/nspawn.sh"))
        .arg(&deb)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&run.stderr));
    assert!(
        run.status.success(),
        "the installation test failed (see above)"
    );
    assert!(stdout.contains("PASS:"), "the script ran to its end");
}
