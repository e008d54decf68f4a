//! Finding the cases of an evaluation dataset on disk.
//!
//! Two layouts are recognised, folder by folder directly under the dataset directory:
//! - PNG slices (the published layout): one folder per slice holding a `*T1w*.png`, a
//!   `*FLAIR*.png` (not containing `roi`) and, for patients, a `*roi*.png` lesion mask; a
//!   folder without a roi is a healthy control. The case id is the folder name.
//! - BIDS-like NIfTI: `sub-*/anat/` (or `sub-*/ses-*/anat/`) holding `*T1w.nii.gz`,
//!   `*FLAIR.nii.gz` and optionally `*FLAIR_roi.nii.gz` (`.nii` too). The case id is the
//!   subject folder name (with `_ses-*` appended for sessions).
//!
//! Names are matched case-insensitively. A folder that holds images but cannot make a case (a
//! missing modality, two candidates for one role) becomes a [`Problem`] so that the caller
//! reports it instead of silently evaluating fewer cases. Folders without any PNG or NIfTI file
//! and hidden folders are not cases and are passed over.

use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaseKind {
    /// One 2-D slice from PNG files.
    PngSlice,
    /// One subject's 3-D volumes.
    NiftiSubject,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    pub id: String,
    pub kind: CaseKind,
    pub t1: PathBuf,
    pub flair: PathBuf,
    /// The lesion mask; `None` for a healthy control.
    pub roi: Option<PathBuf>,
}

/// A folder that looks like a case but cannot be evaluated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub id: String,
    pub reason: String,
}

/// The cases of a dataset, sorted by id, and the folders that could not make one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dataset {
    pub cases: Vec<Case>,
    pub problems: Vec<Problem>,
}

/// Scans `dir` for cases in either layout. Fails when `dir` cannot be read or holds nothing
/// recognisable at all.
pub fn discover(dir: &Path) -> Result<Dataset> {
    let mut out = Dataset::default();
    for folder in subdirs(dir)? {
        let name = file_name(&folder);
        if name.to_ascii_lowercase().starts_with("sub-") && has_anat(&folder)? {
            nifti_subject(&folder, &name, &mut out)?;
        } else {
            png_folder(&folder, &name, &mut out)?;
        }
    }
    if out.cases.is_empty() && out.problems.is_empty() {
        bail!(
            "{}: no cases found (expected one folder per slice with *T1w*.png and *FLAIR*.png, \
             or sub-*/anat/ with *T1w.nii.gz and *FLAIR.nii.gz)",
            dir.display()
        );
    }
    out.cases.sort_by(|a, b| a.id.cmp(&b.id));
    out.problems.sort_by(|a, b| a.id.cmp(&b.id));
    if let Some(w) = out.cases.windows(2).find(|w| w[0].id == w[1].id) {
        bail!("{}: two cases share the id {}", dir.display(), w[0].id);
    }
    Ok(out)
}

/// Visible subfolders of `dir`, sorted by path.
fn subdirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let entries = fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let path = entry.path();
        if path.is_dir() && !file_name(&path).starts_with('.') {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Regular files of `dir`, sorted by path.
fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let entries = fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let path = entry.path();
        if path.is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn has_anat(subject: &Path) -> Result<bool> {
    Ok(anat_dirs(subject)?.next().is_some())
}

/// `(session suffix, anat folder)` of a subject: `anat/` itself and `ses-*/anat/`.
fn anat_dirs(subject: &Path) -> Result<impl Iterator<Item = (String, PathBuf)>> {
    let mut out = Vec::new();
    if subject.join("anat").is_dir() {
        out.push((String::new(), subject.join("anat")));
    }
    for ses in subdirs(subject)? {
        let name = file_name(&ses);
        if name.to_ascii_lowercase().starts_with("ses-") && ses.join("anat").is_dir() {
            out.push((format!("_{name}"), ses.join("anat")));
        }
    }
    Ok(out.into_iter())
}

/// The one file of `files` that `role` matches; several are a problem for the case.
fn pick<'a>(
    files: &'a [PathBuf],
    role: impl Fn(&str) -> bool,
    what: &str,
) -> std::result::Result<Option<&'a PathBuf>, String> {
    let hits: Vec<&PathBuf> = files
        .iter()
        .filter(|p| role(&file_name(p).to_ascii_lowercase()))
        .collect();
    match hits[..] {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        _ => Err(format!(
            "several {what} files: {}",
            hits.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Turns the three role lookups of a folder into a case or a problem.
fn assemble(
    id: String,
    kind: CaseKind,
    folder: &Path,
    t1: std::result::Result<Option<&PathBuf>, String>,
    flair: std::result::Result<Option<&PathBuf>, String>,
    roi: std::result::Result<Option<&PathBuf>, String>,
    out: &mut Dataset,
) {
    let made = (|| -> std::result::Result<Case, String> {
        let (t1, flair, roi) = (t1?, flair?, roi?);
        let missing: Vec<&str> = [(t1.is_none(), "T1w"), (flair.is_none(), "FLAIR")]
            .iter()
            .filter(|(m, _)| *m)
            .map(|(_, n)| *n)
            .collect();
        match (t1, flair) {
            (Some(t1), Some(flair)) => Ok(Case {
                id: id.clone(),
                kind,
                t1: t1.clone(),
                flair: flair.clone(),
                roi: roi.cloned(),
            }),
            _ => Err(format!(
                "missing modality: no {} image in {}",
                missing.join(" and no "),
                folder.display()
            )),
        }
    })();
    match made {
        Ok(case) => out.cases.push(case),
        Err(reason) => out.problems.push(Problem { id, reason }),
    }
}

fn png_folder(folder: &Path, name: &str, out: &mut Dataset) -> Result<()> {
    let pngs: Vec<PathBuf> = files(folder)?
        .into_iter()
        .filter(|p| file_name(p).to_ascii_lowercase().ends_with(".png"))
        .collect();
    if pngs.is_empty() {
        return Ok(());
    }
    let t1 = pick(&pngs, |n| n.contains("t1w") && !n.contains("roi"), "T1w");
    let flair = pick(
        &pngs,
        |n| n.contains("flair") && !n.contains("roi"),
        "FLAIR",
    );
    let roi = pick(&pngs, |n| n.contains("roi"), "roi");
    assemble(
        name.to_string(),
        CaseKind::PngSlice,
        folder,
        t1,
        flair,
        roi,
        out,
    );
    Ok(())
}

/// The name without a `.nii` or `.nii.gz` extension, or `None` for other files.
fn nifti_stem(lower_name: &str) -> Option<&str> {
    lower_name
        .strip_suffix(".nii.gz")
        .or_else(|| lower_name.strip_suffix(".nii"))
}

fn nifti_subject(subject: &Path, name: &str, out: &mut Dataset) -> Result<()> {
    for (session, anat) in anat_dirs(subject)? {
        let id = format!("{name}{session}");
        let niftis: Vec<PathBuf> = files(&anat)?
            .into_iter()
            .filter(|p| nifti_stem(&file_name(p).to_ascii_lowercase()).is_some())
            .collect();
        let ends = |suffix: &'static str| {
            move |n: &str| nifti_stem(n).is_some_and(|s| s.ends_with(suffix))
        };
        let t1 = pick(&niftis, ends("t1w"), "*T1w.nii[.gz]");
        let flair = pick(&niftis, ends("flair"), "*FLAIR.nii[.gz]");
        let roi = pick(&niftis, ends("flair_roi"), "*FLAIR_roi.nii[.gz]");
        if niftis.is_empty() {
            out.problems.push(Problem {
                id,
                reason: format!("no NIfTI files in {}", anat.display()),
            });
            continue;
        }
        assemble(id, CaseKind::NiftiSubject, &anat, t1, flair, roi, out);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(dir: &Path, rel: &str) {
        let p = dir.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, b"").unwrap();
    }

    #[test]
    fn png_layout_with_a_missing_modality() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        touch(d, "b/x_T1w.png");
        touch(d, "b/x_FLAIR.png");
        touch(d, "b/x_FLAIR_roi.png");
        touch(d, "a/a_t1w_slice.png");
        touch(d, "a/a_flair_slice.png");
        touch(d, "c/c_FLAIR.png");
        touch(d, "notes/readme.txt");
        touch(d, ".hidden/y_T1w.png");
        let ds = discover(d).unwrap();
        let ids: Vec<&str> = ds.cases.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(ds.cases[0].roi, None);
        assert_eq!(ds.cases[1].roi, Some(d.join("b/x_FLAIR_roi.png")));
        assert_eq!(ds.cases[1].flair, d.join("b/x_FLAIR.png"));
        assert_eq!(ds.problems.len(), 1);
        assert_eq!(ds.problems[0].id, "c");
        assert!(ds.problems[0].reason.contains("missing modality: no T1w"));
    }

    #[test]
    fn nifti_layout_with_sessions() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        touch(d, "sub-02/anat/sub-02_T1w.nii.gz");
        touch(d, "sub-02/anat/sub-02_FLAIR.nii.gz");
        touch(d, "sub-02/anat/sub-02_FLAIR_roi.nii.gz");
        touch(d, "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii");
        touch(d, "sub-01/ses-1/anat/sub-01_ses-1_FLAIR.nii");
        touch(d, "sub-03/anat/sub-03_T1w.nii.gz");
        let ds = discover(d).unwrap();
        let ids: Vec<&str> = ds.cases.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["sub-01_ses-1", "sub-02"]);
        assert_eq!(ds.cases[1].kind, CaseKind::NiftiSubject);
        assert!(ds.cases[1].roi.is_some() && ds.cases[0].roi.is_none());
        assert_eq!(ds.problems.len(), 1);
        assert!(ds.problems[0].reason.contains("no FLAIR"));
    }

    #[test]
    fn ambiguous_and_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        touch(d, "a/1_T1w.png");
        touch(d, "a/2_T1w.png");
        touch(d, "a/1_FLAIR.png");
        let ds = discover(d).unwrap();
        assert!(ds.cases.is_empty());
        assert!(ds.problems[0].reason.contains("several T1w files"));
        let empty = tempfile::tempdir().unwrap();
        let e = discover(empty.path()).unwrap_err().to_string();
        assert!(e.contains("no cases found"), "{e}");
    }
}
