//! The agent's top-level modules may only import each other along the
//! edges listed here. The list is today's graph, cycles included: a new edge
//! fails this test, and an edge that goes away must be struck from the list,
//! so the graph can only shrink towards a one-way order.
//!
//! An edge is a `crate::X` path (single or in a `use crate::{…}` group) in a
//! file of module M, tests included; comments are ignored.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

/// `from -> to`, every top-level import the code makes today.
const ALLOWED: &[(&str, &str)] = &[
    ("admin", "intercept"),
    ("admin", "oci"),
    ("admin", "registry"),
    ("admin", "steer"),
    ("admin", "store"),
    ("admin", "swarm"),
    ("admin", "tracker"),
    ("admin", "upstream"),
    ("agent", "admin"),
    ("agent", "ca"),
    ("agent", "cli"),
    ("agent", "intercept"),
    ("agent", "pki"),
    ("agent", "registry"),
    ("agent", "steer"),
    ("agent", "store"),
    ("agent", "swarm"),
    ("agent", "tracker"),
    ("agent", "upstream"),
    ("ca", "registry"),
    ("ca", "testing"),
    ("cli", "admin"),
    ("cli", "ca"),
    ("cli", "intercept"),
    ("cli", "oci"),
    ("cli", "pki"),
    ("cli", "registry"),
    ("cli", "steer"),
    ("cli", "store"),
    ("cli", "swarm"),
    ("cli", "testing"),
    ("cli", "tracker"),
    ("cli", "upstream"),
    ("intercept", "admin"),
    ("intercept", "registry"),
    ("intercept", "steer"),
    ("oci", "registry"),
    ("oci", "store"),
    ("oci", "testing"),
    ("oci", "upstream"),
    ("pki", "testing"),
    ("registry", "admin"),
    ("registry", "store"),
    ("registry", "swarm"),
    ("registry", "testing"),
    ("registry", "upstream"),
    ("store", "testing"),
    ("swarm", "admin"),
    ("swarm", "pki"),
    ("swarm", "store"),
    ("swarm", "testing"),
    ("swarm", "tracker"),
    ("swarm", "upstream"),
    ("testing", "pki"),
    ("tracker", "admin"),
    ("tracker", "pki"),
    ("tracker", "store"),
    ("upstream", "testing"),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules `code` names through `crate::`.
fn imports(code: &str) -> BTreeSet<String> {
    let code: String = code
        .lines()
        .map(|l| l.split_once("//").map_or(l, |(before, _)| before))
        .collect::<Vec<_>>()
        .join("\n");
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut found = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = code[i + "crate::".len()..].trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of the group: after `{` and after each `,`
            // at depth 0.
            let mut depth = 0;
            let mut start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && !c.is_whitespace() => {
                        start = false;
                        found.insert(ident(&group[j..]));
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    found.retain(|m| !m.is_empty());
    found
}

#[test]
fn top_level_modules_import_each_other_only_along_the_listed_edges() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut edges = BTreeSet::new();
    for entry in fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let module = path.file_stem().unwrap().to_string_lossy().into_owned();
        if matches!(module.as_str(), "lib" | "main") {
            continue;
        }
        let mut files = Vec::new();
        if path.is_dir() {
            rust_files(&path, &mut files);
        } else {
            files.push(path);
        }
        for file in files {
            for to in imports(&fs::read_to_string(&file).unwrap()) {
                if to != module {
                    edges.insert((module.clone(), to));
                }
            }
        }
    }
    let allowed: BTreeSet<(String, String)> = ALLOWED
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    let new: Vec<_> = edges.difference(&allowed).collect();
    let gone: Vec<_> = allowed.difference(&edges).collect();
    assert!(
        new.is_empty(),
        "imports not in the module graph (agent/tests/layers.rs): {new:?}"
    );
    assert!(
        gone.is_empty(),
        "edges no longer in the code: strike them from ALLOWED: {gone:?}"
    );
}

#[test]
fn imports_are_read_from_paths_and_groups_not_comments() {
    let code = "use crate::{a::X, b::{c::Y, d}, e};\n\
                // crate::f in a comment\n\
                let x = crate::g::h(); fn f(_: crate::i::J) {}\n";
    let got: Vec<String> = imports(code).into_iter().collect();
    assert_eq!(got, ["a", "b", "e", "g", "i"]);
}
