//! The docs cannot rot: the command reference is the code's own help (regenerated with
//! `MALLA_BLESS=1`), every link in README.md and docs/ points at a file inside the repository,
//! every resource kind is documented, and every command in a ```` ```sh lab ```` block of
//! README.md and docs/*.md runs, in order, against a real lab (with the lab's name put in for
//! `demo`); a line ending in `# exit N` must exit N, every other line 0.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Lab;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// README.md, then docs/**/*.md in name order.
fn markdown_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "md") {
                out.push(p);
            }
        }
    }
    let mut out = vec![repo().join("README.md")];
    walk(&repo().join("docs"), &mut out);
    out
}

#[test]
fn the_command_reference_is_the_code() {
    let out = Command::new(common::malla_bin())
        .arg("reference")
        .env_remove("MALLA_LAB")
        .output()
        .unwrap();
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    let file = repo().join("docs/reference/cli.md");
    if std::env::var_os("MALLA_BLESS").is_some() {
        std::fs::write(&file, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&file).unwrap_or_default();
    assert!(
        checked_in == generated,
        "docs/reference/cli.md differs from the code's help: run `MALLA_BLESS=1 cargo test -p malla --test docs the_command_reference` and commit it"
    );
}

/// `[text](target)` targets of a Markdown file, outside code blocks.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_code = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("](") {
            let tail = &rest[i + 2..];
            let Some(j) = tail.find(')') else { break };
            out.push(tail[..j].to_string());
            rest = &tail[j..];
        }
    }
    out
}

#[test]
fn links_stay_inside_the_repository() {
    let root = repo();
    for f in markdown_files() {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(
            !text.contains("../shared/") && !text.contains("/work/"),
            "{} points outside the repository",
            f.display()
        );
        for l in links(&text) {
            if l.starts_with("http://") || l.starts_with("https://") || l.starts_with('#') {
                continue;
            }
            let path = l.split('#').next().unwrap();
            let target = f.parent().unwrap().join(path);
            let resolved = target
                .canonicalize()
                .unwrap_or_else(|_| panic!("{}: link {l} leads nowhere", f.display()));
            assert!(
                resolved.starts_with(&root),
                "{}: link {l} leaves the repository",
                f.display()
            );
        }
    }
}

#[test]
fn every_resource_kind_is_documented() {
    let out = Command::new(common::malla_bin())
        .arg("crds")
        .output()
        .unwrap();
    let crds = String::from_utf8(out.stdout).unwrap();
    let doc = std::fs::read_to_string(repo().join("docs/reference/resources.md")).unwrap();
    let mut kinds = Vec::new();
    let mut in_names = false;
    for line in crds.lines() {
        let t = line.trim();
        if t == "names:" {
            in_names = true;
        } else if in_names {
            if let Some(k) = t.strip_prefix("kind: ") {
                kinds.push(k.to_string());
                in_names = false;
            }
        }
    }
    assert!(kinds.len() >= 5, "{kinds:?}");
    for k in kinds.iter().map(String::as_str).chain([
        "Namespace",
        "Pod",
        "Service",
        "EndpointSlice",
        "NetworkPolicy",
    ]) {
        assert!(
            doc.contains(&format!("### {k}")),
            "docs/reference/resources.md has no section for {k}"
        );
    }
}

/// One command of a runnable block: (file, line number, command, expected exit status).
struct Example {
    file: String,
    line: usize,
    command: String,
    exit: i32,
}

fn examples() -> Vec<Example> {
    let mut out = Vec::new();
    for f in markdown_files() {
        let text = std::fs::read_to_string(&f).unwrap();
        let name = f
            .strip_prefix(repo())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let mut in_block = false;
        let mut pending = String::new();
        let mut start = 0;
        for (i, line) in text.lines().enumerate() {
            let t = line.trim();
            if !in_block {
                in_block = t == "```sh lab";
                continue;
            }
            if t == "```" {
                in_block = false;
                continue;
            }
            if pending.is_empty() {
                start = i + 1;
            }
            if let Some(cont) = line.strip_suffix('\\') {
                pending.push_str(cont);
                pending.push(' ');
                continue;
            }
            pending.push_str(line);
            let command = std::mem::take(&mut pending);
            let body = command.trim();
            if body.is_empty() || body.starts_with('#') {
                continue;
            }
            let exit = body
                .rsplit_once("# exit ")
                .and_then(|(_, n)| n.trim().parse().ok())
                .unwrap_or(0);
            out.push(Example {
                file: name.clone(),
                line: start,
                command: body.to_string(),
                exit,
            });
        }
    }
    out
}

#[test]
fn the_docs_commands_run_against_a_lab() {
    let all = examples();
    assert!(
        all.len() >= 20,
        "only {} runnable examples found in the docs",
        all.len()
    );
    for f in [
        "README.md",
        "docs/getting-started.md",
        "docs/troubleshooting.md",
    ] {
        assert!(
            all.iter().any(|e| e.file == f),
            "{f} has no runnable example"
        );
    }
    let lab = Lab::new(&common::malla_bin(), "docs");
    // The commands run from a directory of their own where examples/ is the repository's.
    let cwd = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(repo().join("examples"), cwd.path().join("examples")).unwrap();
    let bin_dir = common::malla_bin().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for e in &all {
        let acts_on_a_lab = [
            " lab ",
            " ipam ",
            " status",
            " diags",
            " services ",
            " policy ",
        ]
        .iter()
        .any(|w| e.command.contains(&format!("malla{w}")));
        assert!(
            !acts_on_a_lab || e.command.contains("--lab demo"),
            "{}:{}: `{}` must name its lab (--lab demo), or it acts on whichever lab is the default",
            e.file,
            e.line,
            e.command
        );
        let command = e
            .command
            .replace("--lab demo", &format!("--lab {}", lab.name))
            .replace("malla-demo-", &format!("malla-{}-", lab.name));
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!("set -o pipefail; {command}"))
            .current_dir(cwd.path())
            .env("PATH", &path)
            .env("MALLA_LAB_STATE_DIR", lab.state_root.path())
            .env("MALLA_LAB", &lab.name)
            .env_remove("MALLA_DATASTORE")
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(e.exit),
            "{}:{}: `{}` exited {:?}, the docs say {}\nstdout:\n{}\nstderr:\n{}",
            e.file,
            e.line,
            e.command,
            out.status.code(),
            e.exit,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
