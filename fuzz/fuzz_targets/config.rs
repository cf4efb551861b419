//! The YAML config: `Config::parse(text, path)` (`daemon/src/config`), what
//! `popupd run -c FILE` and `popupd check-config` read from a file an
//! administrator or a person wrote (and `popupd user add` generated).
//!
//! It must never panic, and a bad file must give an error that names the
//! file and, unless the error is about the whole file, a line that exists.
//!
//! The config names certificate, key and CA files; the target makes a
//! real CA and certificates once (with `popupd::ca`, in a fixture folder
//! under the temp dir) and gives the parser a path in that folder, so the
//! seed configs' relative paths (`pki/ca.crt`, ...) load for real and the
//! checks after the files (key pairs, names, addresses, durations, limits,
//! the agent's proxy and plugins) are reached. `HOME` is that folder and
//! the proxy variables are cleared, so no input depends on this machine.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use popupd::config::Config;

/// Errors about the file as a whole, which name no line (`Cx::whole`).
const WHOLE_FILE: &[&str] = &["no role configured", "two homes are named", "HTTPS_PROXY: "];

const NAMES: &[&str] = &[
    "global.example.org",
    "home-a.example.org",
    "home-b.example.org",
];

fn fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join("popupd-fuzz-config");
        let ready = dir.join("pki").join("ready");
        if !ready.exists() {
            // Built aside and renamed, so parallel fuzz jobs never see half
            // a fixture.
            let tmp =
                std::env::temp_dir().join(format!("popupd-fuzz-config.{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            let pki = tmp.join("pki");
            popupd::ca::init(&pki).expect("make the fixture CA");
            for n in NAMES {
                popupd::ca::issue(&pki, n, &pki).expect("issue a fixture certificate");
            }
            std::fs::write(pki.join("revoked"), "# revoked homes\nhome-z.example.org\n")
                .expect("write the fixture revocation list");
            std::fs::write(pki.join("ready"), "").expect("mark the fixture ready");
            if std::fs::rename(&tmp, &dir).is_err() {
                // Another job made it first.
                let _ = std::fs::remove_dir_all(&tmp);
            }
        }
        // SAFETY: set once, before any input runs, while libFuzzer's one
        // thread is the only thread of this process.
        unsafe {
            std::env::set_var("HOME", &dir);
            std::env::set_var("SSL_CERT_FILE", dir.join("pki").join("ca.crt"));
            for v in [
                "HTTPS_PROXY",
                "https_proxy",
                "ALL_PROXY",
                "all_proxy",
                "NO_PROXY",
                "no_proxy",
            ] {
                std::env::remove_var(v);
            }
        }
        dir
    })
}

/// Lines of `text` as a YAML parser may count them (any line break).
fn lines(text: &str) -> usize {
    1 + text
        .chars()
        .filter(|c| matches!(c, '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}'))
        .count()
}

fuzz_target!(|data: &[u8]| {
    // `Config::load` reads the file with `read_to_string`: not UTF-8 is an
    // I/O error before the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = fixture().join("popupd.yaml");
    let shown = path.display().to_string();
    match Config::parse(text, &path) {
        Ok(cfg) => {
            assert!(!cfg.roles().is_empty(), "a config that runs nothing parsed");
            let _ = cfg.warnings();
        }
        Err(e) => {
            let said = e.to_string();
            assert_eq!(e.file, shown, "the error names another file: {said}");
            assert!(
                said.starts_with(&shown),
                "the error does not start with the file: {said}"
            );
            if e.line == 0 {
                assert!(
                    WHOLE_FILE.iter().any(|m| e.message.starts_with(m)),
                    "an error about part of the file names no line: {said}"
                );
            } else {
                assert!(
                    e.line as usize <= lines(text),
                    "the error names line {} of a {}-line file: {said}",
                    e.line,
                    lines(text)
                );
                assert!(said.starts_with(&format!("{shown}:{}:", e.line)));
            }
        }
    }
});
