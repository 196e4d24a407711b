//! ARCHITECTURE.md stays true to the code: its layer table is the one
//! `layers.rs` enforces, and every file, folder and `file:function` it names
//! exists.

use std::{collections::BTreeMap, fs, path::Path};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn doc() -> String {
    fs::read_to_string(repo().join("ARCHITECTURE.md")).unwrap()
}

/// Module -> layer, from the "Layers" table (a row with an empty layer
/// cell continues the layer above).
fn doc_layers(doc: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    let mut layer = None;
    let section = doc.split("## Layers").nth(1).unwrap();
    let section = section.split("\n## ").next().unwrap();
    for line in section.lines().filter(|l| l.starts_with("| ")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if let Ok(n) = cells[1].parse::<usize>() {
            layer = Some(n);
        } else if !cells[1].is_empty() {
            continue; // the header
        }
        for m in cells[2].split(',') {
            let m = m.trim().trim_matches('`');
            if !m.is_empty() {
                out.insert(m.to_string(), layer.unwrap());
            }
        }
    }
    out
}

/// The layer table of `layers.rs`, read from its source.
fn test_layers() -> BTreeMap<String, usize> {
    let src =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/layers.rs")).unwrap();
    let table = src.split("const LAYERS").nth(1).unwrap();
    let table = &table[..table.find("];").unwrap()];
    let mut out = BTreeMap::new();
    for (n, row) in table
        .lines()
        .filter(|l| l.trim_start().starts_with("&["))
        .enumerate()
    {
        for m in row.split('"').skip(1).step_by(2) {
            out.insert(m.to_string(), n);
        }
    }
    out
}

#[test]
fn the_documented_layers_are_the_enforced_ones() {
    let documented = doc_layers(&doc());
    let enforced = test_layers();
    assert!(enforced.len() >= 15, "{enforced:?}");
    assert_eq!(
        documented, enforced,
        "ARCHITECTURE.md vs agent/tests/layers.rs"
    );
}

/// Where a path named in the document lives: repository paths as they are,
/// module paths under `agent/src/`.
fn resolve(path: &str) -> Option<std::path::PathBuf> {
    [repo().join(path), repo().join("agent/src").join(path)]
        .into_iter()
        .find(|p| p.exists())
}

#[test]
fn every_path_and_function_the_document_names_exists() {
    let doc = doc();
    let mut checked = 0;
    let mut missing = Vec::new();
    for span in doc.split('`').skip(1).step_by(2) {
        let (path, item) = match span.split_once(':') {
            Some((p, i)) if p.ends_with(".rs") => (p, Some(i)),
            _ => (span, None),
        };
        let looks_like_path = path.ends_with(".rs") || path.ends_with(".md") || path.ends_with('/');
        // A bare file name (`mod.rs`, `tests.rs`) is a kind of file, not one.
        if !looks_like_path || !path.contains('/') || path.contains(' ') || path.contains('*') {
            continue;
        }
        let Some(file) = resolve(path) else {
            missing.push(span.to_string());
            continue;
        };
        checked += 1;
        let Some(item) = item else { continue };
        let code = fs::read_to_string(&file).unwrap();
        // `Type::method` or `function`; `name4/6` names both.
        let (ty, f) = match item.rsplit_once("::") {
            Some((t, f)) => (Some(t), f),
            None => (None, item),
        };
        let names: Vec<String> = match f.strip_suffix("4/6") {
            Some(stem) => vec![format!("{stem}4"), format!("{stem}6")],
            None => vec![f.to_string()],
        };
        if ty.is_none() && f.starts_with(char::is_uppercase) {
            // A type.
            if !["struct", "enum", "trait", "type"]
                .iter()
                .any(|k| code.contains(&format!("{k} {f}")))
            {
                missing.push(span.to_string());
            }
            continue;
        }
        for name in names {
            let has_fn =
                code.contains(&format!("fn {name}(")) || code.contains(&format!("fn {name}<"));
            let has_ty = ty.is_none_or(|t| {
                code.contains(&format!("impl {t} {{")) || code.contains(&format!("impl {t}<"))
            });
            if !has_fn || !has_ty {
                missing.push(format!("{path}:{item} ({name})"));
            }
        }
    }
    assert!(
        checked >= 40,
        "only {checked} paths found in ARCHITECTURE.md"
    );
    assert!(
        missing.is_empty(),
        "named in ARCHITECTURE.md but not in the code: {missing:?}"
    );
}
