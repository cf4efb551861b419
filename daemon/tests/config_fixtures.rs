//! Every file in `fixtures/config/valid` loads; every file in
//! `fixtures/config/invalid` is refused with the error its first line names
//! (`# expect: TEXT`). The example configs in `packaging/examples` load
//! too, once their certificates exist. Certificates are made fresh for the
//! run, under the paths the fixtures name.

// Test code: an unwrap that fails is the test failing (as clippy.toml
// allows in #[test] functions, here for their helpers too).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use popupd::config::Config;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("popupd-fixtures-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let pki = d.join("pki");
    popupd::ca::init(&pki).unwrap();
    for n in [
        "global.test",
        "home-a.test",
        "home-b.test",
        "global.example.org",
        "home-a.example.org",
        "home-b.example.org",
    ] {
        popupd::ca::issue(&pki, n, &pki).unwrap();
    }
    // A key others may read, for the fixture that must refuse it.
    use std::os::unix::fs::PermissionsExt;
    let open = pki.join("open.key");
    std::fs::copy(pki.join("home-a.test.key"), &open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    d
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    v.sort();
    v
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config")
}

#[test]
fn valid_configs_load() {
    let work = scratch("valid");
    let files = yaml_files(&fixtures().join("valid"));
    assert!(files.len() >= 4, "the valid fixtures are there");
    for f in files {
        let copy = work.join(f.file_name().unwrap());
        std::fs::copy(&f, &copy).unwrap();
        let cfg = Config::load(&copy).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(!cfg.roles().is_empty(), "{} runs a role", f.display());
    }
    std::fs::remove_dir_all(work).unwrap();
}

#[test]
fn invalid_configs_are_refused_with_file_line_and_reason() {
    let work = scratch("invalid");
    let files = yaml_files(&fixtures().join("invalid"));
    assert!(files.len() >= 8, "the invalid fixtures are there");
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let want = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} must start with `# expect: `", f.display()));
        let copy = work.join(f.file_name().unwrap());
        std::fs::write(&copy, &text).unwrap();
        let err = Config::load(&copy)
            .expect_err(&format!("{} must be refused", f.display()))
            .to_string();
        assert!(
            err.starts_with(&copy.display().to_string()),
            "names the file: {err}"
        );
        assert!(
            err.contains(want.trim_end()),
            "{}: wanted {want:?} in:\n{err}",
            f.display()
        );
        assert!(
            err.contains("hint:") || want.contains("hint"),
            "{}: gives a hint:\n{err}",
            f.display()
        );
    }
    std::fs::remove_dir_all(work).unwrap();
}

#[test]
fn packaged_examples_load_once_their_certificates_exist() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/examples");
    let files = yaml_files(&examples);
    assert!(files.len() >= 4, "the examples are there");
    let work = scratch("examples");
    let pki = work.join("pki");
    for f in files {
        // Point the absolute paths of the examples into the scratch folder.
        let text = std::fs::read_to_string(&f)
            .unwrap()
            .replace("/etc/popupd/pki/", &format!("{}/", pki.display()))
            .replace("/etc/popupd/", &format!("{}/", work.display()))
            .replace("/var/lib/popupd/", &format!("{}/data/", work.display()))
            .replace("~/.config/popupd/", &format!("{}/", pki.display()));
        let copy = work.join(f.file_name().unwrap());
        std::fs::write(&copy, text).unwrap();
        if let Err(e) = Config::load(&copy) {
            panic!("{}: {e}", f.display());
        }
    }
    std::fs::remove_dir_all(work).unwrap();
}
