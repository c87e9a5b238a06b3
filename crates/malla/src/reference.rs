//! The command reference (`docs/reference/cli.md`), rendered from the command line's own
//! definition so it cannot drift: `malla reference` (hidden) prints it, and a test fails when the
//! checked-in file differs (`MALLA_BLESS=1 cargo test -p malla --test docs` rewrites it).

use clap::Command;

/// Hides environment values (the reference must not depend on the caller's environment),
/// recursively.
fn hide_env(cmd: Command) -> Command {
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    let mut cmd = cmd.mut_args(|a| a.hide_env_values(true));
    for n in names {
        cmd = cmd.mut_subcommand(n, hide_env);
    }
    cmd
}

fn walk(cmd: &mut Command, path: &str, out: &mut String) {
    out.push_str(&format!(
        "## `{path}`\n\n```text\n{}\n```\n\n",
        cmd.render_long_help().to_string().trim_end()
    ));
    for sub in cmd.get_subcommands_mut() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        let p = format!("{path} {}", sub.get_name());
        walk(sub, &p, out);
    }
}

/// The reference as Markdown.
pub fn markdown() -> String {
    let mut cmd = hide_env(crate::cli_command()).term_width(100);
    cmd.build();
    let mut out = String::from(
        "# Command reference\n\n\
         Generated from the code by `malla reference`; do not edit (the test\n\
         `crates/malla/tests/docs.rs` fails when this file and the code differ; run\n\
         `MALLA_BLESS=1 cargo test -p malla --test docs` to regenerate it).\n\n\
         `malla-cni` is run by the container runtime (CNI); by hand it answers only `--version`.\n\n",
    );
    walk(&mut cmd, "malla", &mut out);
    // Trailing blanks (clap indents its empty lines) would not survive an editor.
    let lines: Vec<&str> = out.trim_end().lines().map(str::trim_end).collect();
    lines.join("\n") + "\n"
}
