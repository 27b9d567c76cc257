//! `systemd/pgsluice.service` is a unit systemd accepts: `systemd-analyze verify` on a copy
//! pointing at the built binary says nothing (no unknown key, no bad value), when systemd is
//! installed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

const UNIT: &str = include_str!("../systemd/pgsluice.service");

#[test]
fn the_unit_file_verifies() {
    let Ok(out) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        eprintln!("SKIPPED: systemd-analyze is not installed");
        return;
    };
    assert!(out.status.success());
    // The unit as installed, but with this build's binary (verify checks that it exists).
    let binary = env!("CARGO_BIN_EXE_pgsluice");
    assert!(UNIT.contains("/usr/local/bin/pgsluice"));
    let dir = std::env::temp_dir().join(format!("pgsluice-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("pgsluice.service");
    std::fs::write(&path, UNIT.replace("/usr/local/bin/pgsluice", binary)).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    for key in [
        "Type=notify",
        "TimeoutStopSec=",
        "RuntimeDirectory=pgsluice",
        "CapabilityBoundingSet=",
    ] {
        assert!(UNIT.contains(key), "{key}");
    }
}
