//! Every `damselfly …` command the docs show parses with this binary's
//! command line: the subcommands and flags exist and their values are
//! accepted. A doc that drifts from `--help` fails here, not in a user's
//! terminal.

use clap::{
    Parser as _,
    error::{ContextKind, ContextValue, ErrorKind},
};
use damselfly::cli::Cli;

/// The documents a user copies commands from, relative to the workspace.
const DOCS: &[&str] = &[
    "README.md",
    "SECURITY.md",
    "deploy/README.md",
    "deploy/manifests/README.md",
    "deploy/helm/damselfly/README.md",
    "deploy/helm/damselfly/templates/NOTES.txt",
];

/// The command lines in `text` that run `damselfly`: lines of code blocks
/// (or inline code spans) where `damselfly` stands in command position,
/// with `\` continuations joined and shell comments, pipes and redirections
/// cut off; each with whether it came from an inline span (prose may name a
/// flag there without its value).
fn commands(text: &str, indented_is_code: bool) -> Vec<(String, bool)> {
    let mut found = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        let code = in_block || (indented_is_code && line.starts_with("  "));
        let pieces: Vec<String> = if code {
            // Code blocks, and the indented lines of a text file (NOTES.txt).
            pending.push_str(line.trim_end_matches('\\'));
            if line.ends_with('\\') {
                pending.push(' ');
                continue;
            }
            vec![std::mem::take(&mut pending)]
        } else {
            // Inline code spans.
            line.split('`')
                .skip(1)
                .step_by(2)
                .map(String::from)
                .collect()
        };
        let inline = !code;
        for piece in pieces {
            let piece = strip_inline_comments(&piece);
            for (start, _) in piece.match_indices("damselfly ") {
                let before = piece[..start].trim_end();
                let in_command_position = before.is_empty()
                    || before.ends_with("--")
                    || before.ends_with('$')
                    || before.ends_with("sudo")
                    || before.ends_with("&&")
                    || before.ends_with(';');
                if in_command_position {
                    found.push((cut_shell(&piece[start..]), inline));
                }
            }
        }
    }
    found
}

/// Drops `` `# …` `` (comments inside a continued command) and `{{ … }}`
/// (Helm template expressions, which stand for a value).
fn strip_inline_comments(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(i) = rest.find("`#") {
        out.push_str(&rest[..i]);
        rest = rest[i + 1..].split_once('`').map_or("", |(_, after)| after);
    }
    out.push_str(rest);
    let mut templated = String::new();
    let mut rest = out.as_str();
    while let Some(i) = rest.find("{{") {
        templated.push_str(&rest[..i]);
        templated.push('X');
        rest = rest[i..].split_once("}}").map_or("", |(_, after)| after);
    }
    templated.push_str(rest);
    templated
}

/// The command up to the first comment, pipe, list operator or redirection,
/// with usage notation resolved: optional `[…]` parts are kept (their flags
/// must exist too), of alternatives `[A | B]` the first.
fn cut_shell(cmd: &str) -> String {
    let mut plain = String::new();
    let mut depth = 0;
    let mut skipping = false;
    let mut prev = ' ';
    let mut chars = cmd.chars().peekable();
    while let Some(c) = chars.next() {
        // `[` opens an optional part at a word's start (`[--zone Z]`) or
        // before more of a list (`URL[,URL...]`), not in `[::1]:7403`.
        let opens = c == '[' && (prev.is_whitespace() || chars.peek() == Some(&','));
        match c {
            '[' if opens => depth += 1,
            ']' if depth > 0 => {
                depth -= 1;
                skipping = false;
            }
            '|' if depth > 0 => skipping = true,
            _ if skipping => {}
            c => plain.push(c),
        }
        prev = c;
    }
    let cmd = plain.as_str();
    let mut end = cmd.len();
    for stop in [" #", " |", " &&", " ;", " >", " 2>"] {
        if let Some(i) = cmd.find(stop) {
            end = end.min(i);
        }
    }
    cmd[..end].split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Shell words, enough for the docs: quotes group, `$(…)` and `$VAR` stay
/// one word.
fn words(cmd: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quote = None;
    for c in cmd.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => quote = Some(c),
            (None, c) if c.is_whitespace() => {
                if !word.is_empty() {
                    out.push(std::mem::take(&mut word));
                }
            }
            (None, c) => word.push(c),
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    // `...` stands for a flag's value, or for more of the same; `REF|URL`
    // for either.
    let mut resolved: Vec<String> = Vec::new();
    for w in out {
        if w == "..." {
            if resolved.last().is_some_and(|p| p.starts_with("--")) {
                resolved.push("X".into());
            }
            continue;
        }
        resolved.push(match w.split_once('|') {
            Some((first, _)) => first.to_string(),
            None => w,
        });
    }
    resolved
}

/// `R`, `HOST`, `NODE-IP`: how the docs write "put yours here".
fn is_placeholder(value: &str) -> bool {
    value.chars().any(|c| c.is_ascii_uppercase())
        && value
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

#[test]
fn every_damselfly_command_in_the_docs_parses() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let mut checked = 0;
    let mut failures = Vec::new();
    for doc in DOCS {
        let text = std::fs::read_to_string(format!("{root}/{doc}"))
            .unwrap_or_else(|e| panic!("reading {doc}: {e}"));
        for (cmd, inline) in commands(&text, !doc.ends_with(".md")) {
            checked += 1;
            let words = words(&cmd);
            let Err(e) = Cli::try_parse_from(&words) else {
                continue;
            };
            let names_a_flag = inline
                && e.kind() == ErrorKind::InvalidValue
                && words.last().is_some_and(|w| w.starts_with("--"));
            // `--download-rate R`: the docs' placeholder, not a value.
            let placeholder = matches!(
                e.get(ContextKind::InvalidValue),
                Some(ContextValue::String(v)) if is_placeholder(v)
            );
            if names_a_flag || placeholder {
                continue;
            }
            // Naming a subcommand in prose (`damselfly get`) leaves out its
            // arguments; asking for help is a command that works.
            if matches!(
                e.kind(),
                ErrorKind::MissingRequiredArgument
                    | ErrorKind::DisplayHelp
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                    | ErrorKind::DisplayVersion
            ) {
                continue;
            }
            failures.push(format!("{doc}: `{cmd}`\n{}", e.render()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The docs show the agent, the tracker, ca, get, preheat and status.
    assert!(
        checked >= 20,
        "only {checked} commands found: extraction broke?"
    );
}

#[test]
fn extraction_finds_commands_where_a_user_would_run_them() {
    let doc = "Run `damselfly status --json` or see `damselfly`.\n\
               ```sh\n\
               damselfly agent \\\n  --instance x `# a comment` \\\n  --admin 127.0.0.1:1\n\
               kubectl exec POD -- damselfly ca show | openssl x509 -noout\n\
               echo damselfly is a word here\n\
               ```\n";
    let cmds: Vec<String> = commands(doc, false).into_iter().map(|(c, _)| c).collect();
    assert_eq!(
        cmds,
        [
            "damselfly status --json",
            "damselfly agent --instance x --admin 127.0.0.1:1",
            "damselfly ca show",
        ]
    );
    assert_eq!(
        cut_shell("damselfly get R [--platform P | --all] [--parallel 4] | jq"),
        "damselfly get R --platform P --parallel 4"
    );
    assert_eq!(
        cut_shell("damselfly x --seed U[,U...] --listen 127.0.0.1:1,[::1]:1"),
        "damselfly x --seed U,U... --listen 127.0.0.1:1,[::1]:1"
    );
    assert_eq!(
        words("a 'b c' \"d\" $(e) REF|URL ... --f ..."),
        ["a", "b c", "d", "$(e)", "REF", "--f", "X"]
    );
}
