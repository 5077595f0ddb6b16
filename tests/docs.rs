//! The docs a newcomer reads point at files that exist in a clone (the README once
//! linked `../shared/docs/…`, which is not part of the repository).

use std::path::{Path, PathBuf};

/// Relative link targets of markdown `[text](target)` links in `text`.
fn relative_links(text: &str) -> Vec<String> {
    let mut links = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        let Some(end) = rest.find(')') else { break };
        let target = rest[..end].split('#').next().unwrap_or_default().trim();
        if !target.is_empty() && !target.contains("://") && !target.starts_with("mailto:") {
            links.push(target.to_owned());
        }
        rest = &rest[end..];
    }
    links
}

#[test]
fn every_relative_link_in_the_readme_and_docs_resolves_inside_the_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages: Vec<PathBuf> = vec![root.join("README.md"), root.join("benches/README.md")];
    for entry in std::fs::read_dir(root.join("docs")).expect("docs/ exists") {
        let path = entry.expect("a docs entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path);
        }
    }
    let mut checked = 0;
    for page in &pages {
        let text = std::fs::read_to_string(page).expect("the page reads");
        let dir = page.parent().expect("a page is in a folder");
        for link in relative_links(&text) {
            let target = dir.join(&link);
            assert!(
                target.exists(),
                "{}: link {link:?} points at nothing",
                page.display()
            );
            let resolved = target.canonicalize().expect("it exists");
            assert!(
                resolved.starts_with(root.canonicalize().expect("the root exists")),
                "{}: link {link:?} leaves the repository",
                page.display()
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "the README links the architecture and benchmark docs"
    );
    assert!(
        std::fs::read_to_string(root.join("README.md"))
            .expect("README")
            .contains("](docs/architecture.md)")
    );
}
