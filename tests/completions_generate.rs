//! `timbridge completions <shell>` prints a completion script that knows the
//! subcommands and their options.

mod common;

use std::process::Command;

use common::process::BIN;

#[test]
fn every_shell_gets_a_script_naming_the_subcommands() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = common::fork::output(Command::new(BIN).args(["completions", shell])).unwrap();
        assert!(
            out.status.success(),
            "{shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script = String::from_utf8_lossy(&out.stdout);
        for word in [
            "serve",
            "check-config",
            "send",
            "spool",
            "client-ip",
            "require-topics",
        ] {
            assert!(script.contains(word), "{shell} script lacks {word}");
        }
    }
    let out = common::fork::output(Command::new(BIN).args(["completions", "tcsh"])).unwrap();
    assert!(!out.status.success());
}

#[test]
fn bash_accepts_the_script() {
    let out = common::fork::output(Command::new(BIN).args(["completions", "bash"])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("timbridge.bash");
    std::fs::write(&path, &out.stdout).unwrap();
    // Sourcing defines the completion function and registers it.
    let check = common::fork::output(
        Command::new("bash")
            .arg("-c")
            .arg(format!(". {} && complete -p timbridge", path.display())),
    )
    .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(String::from_utf8_lossy(&check.stdout).contains("timbridge"));
}
