//! Closed sets of choices named by a word (`--device cpu`, `precision="bf16"`), parsed the
//! same way by every front end.

use anyhow::{anyhow, Result};

/// The member of `all` whose `label` is `s` (ignoring ASCII case); an error naming `what`
/// and listing the labels otherwise.
pub(crate) fn parse<T: Copy>(
    s: &str,
    what: &str,
    all: &[T],
    label: fn(T) -> &'static str,
) -> Result<T> {
    all.iter()
        .copied()
        .find(|&v| label(v).eq_ignore_ascii_case(s))
        .ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|&v| label(v)).collect();
            anyhow!("{what} {s:?}: expected one of {}", names.join(", "))
        })
}
