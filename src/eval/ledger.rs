//! What makes an evaluation resumable: run.json pins the inputs and settings the records
//! depend on, records.jsonl holds one line per finished slice, and slices.csv follows it.
//! metrics.json exists only while the results are final: a run removes it when it starts and
//! writes it when it finishes, so a shard's metrics.json says that the shard is done.

use super::rows::{csv_text, Fnv1a, Row};
use super::{Job, Maps, ModelFiles, MAPS_DIR, METRICS_FILE, RECORDS_FILE, RUN_FILE, SLICES_FILE};
use crate::io::absolute;
use crate::io::atomic::write_atomic;
use crate::io::dataset::Problem;
use crate::metrics::Evaluation;
use crate::precision::Precision;
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The `anomaly_map` of metrics.json: the guided model's maps, or the FLAIR baseline's.
const DIFFUSION: &str = "diffusion";
const FLAIR: &str = "flair";

fn file_hash(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Fnv1a::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:016x}", h.0))
}

/// The part of run.json a resumed run must match, passed through JSON text once so that it
/// compares equal to the same key read back from the file.
pub(super) fn run_key(maps: &Maps, job: &Job) -> Result<Value> {
    let s = &job.settings;
    let (config, size) = maps.grid()?;
    let mut key = json!({
        "data": absolute(job.data),
        "image_size": size,
        "threshold": s.threshold,
        "radius": s.radius,
        "slices": format!("{}:{}", s.slices.first, s.slices.last),
    });
    match maps {
        Maps::Diffusion { engines, sampling } => {
            let files = ModelFiles::of(engines)?;
            key["config_fnv1a"] = json!(file_hash(config)?);
            key["unet_fnv1a"] = json!(file_hash(files.unet)?);
            key["classifier_fnv1a"] = json!(file_hash(files.classifier)?);
            key["steps"] = json!(sampling.steps);
            key["guidance"] = json!(sampling.guidance);
            key["hist_match"] = json!(sampling.hist_match);
            key["seed"] = json!(sampling.seed);
            // fp32 runs keep the key they had before precisions existed.
            if files.precision != Precision::Fp32 {
                key["precision"] = json!(files.precision.label());
            }
        }
        // Diffusion runs keep the key they had before the baseline existed.
        Maps::Flair { .. } => key["anomaly_map"] = json!(FLAIR),
    }
    // What a run writes is part of what it is: a resumed run without the maps of the slices
    // done before would look complete. Runs without maps keep their earlier key.
    if job.save_maps {
        key["save_maps"] = json!(true);
    }
    Ok(serde_json::from_str(&key.to_string())?)
}

/// What the anomaly maps of the run with this key were: [`FLAIR`] or [`DIFFUSION`].
fn anomaly_map(key: &Value) -> &str {
    key["anomaly_map"].as_str().unwrap_or(DIFFUSION)
}

/// The key in the run.json of `dir`, `None` when no run started there.
pub(super) fn recorded_key(dir: &Path) -> Result<Option<Value>> {
    let run_path = dir.join(RUN_FILE);
    if !run_path.exists() {
        return Ok(None);
    }
    let text =
        fs::read_to_string(&run_path).with_context(|| format!("reading {}", run_path.display()))?;
    let run: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not JSON (use --restart)", run_path.display()))?;
    Ok(Some(run["key"].clone()))
}

/// Records of an earlier run in `out`: checks its run.json against `key` and reads
/// records.jsonl ([`read_records`]).
pub(super) fn earlier_records(out: &Path, key: &Value) -> Result<(Vec<Row>, Option<u64>)> {
    let Some(old) = recorded_key(out)? else {
        let rec_path = out.join(RECORDS_FILE);
        ensure!(
            !rec_path.exists(),
            "{} exists but {} does not: use a new --out or --restart",
            rec_path.display(),
            out.join(RUN_FILE).display()
        );
        return Ok((Vec::new(), None));
    };
    if &old != key {
        let none = Value::Null;
        let names: BTreeSet<&String> = key
            .as_object()
            .into_iter()
            .chain(old.as_object())
            .flat_map(|m| m.keys())
            .collect();
        let differ: Vec<String> = names
            .into_iter()
            .filter(|k| old.get(k.as_str()) != key.get(k.as_str()))
            .map(|k| {
                let was = old.get(k.as_str()).unwrap_or(&none);
                format!("{k} {was} (now {})", key.get(k.as_str()).unwrap_or(&none))
            })
            .collect();
        bail!(
            "{} was started with other inputs or settings ({}): use a new --out, or --restart to discard its results",
            out.display(),
            differ.join(", ")
        );
    }
    read_records(out)
}

/// The rows of records.jsonl in `dir` (none when it is absent) and, when a run killed while
/// appending left a partial last line, the length of the complete lines to cut the file to.
pub(super) fn read_records(dir: &Path) -> Result<(Vec<Row>, Option<u64>)> {
    let rec_path = dir.join(RECORDS_FILE);
    if !rec_path.exists() {
        return Ok((Vec::new(), None));
    }
    let bytes = fs::read(&rec_path).with_context(|| format!("reading {}", rec_path.display()))?;
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let text = std::str::from_utf8(&bytes[..complete])
        .with_context(|| format!("{}: not UTF-8 text", rec_path.display()))?;
    let mut rows: Vec<Row> = Vec::new();
    // Each slice's place in `rows` and its line.
    let mut seen: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: Row = serde_json::from_str(line)
            .map_err(anyhow::Error::from)
            .and_then(|r: Row| r.check().map(|()| r))
            .with_context(|| {
                format!(
                    "{} line {}: not a slice record (delete the line, or use --restart)",
                    rec_path.display(),
                    i + 1
                )
            })?;
        if let Some(&(at, first)) = seen.get(&row.id) {
            // One writer per folder makes a repeat impossible; a folder that has one was
            // written by two runs at once, or edited.
            ensure!(
                rows[at] == row,
                "{} line {}: slice {} recorded again, differently from line {}: the records \
                 of two runs are mixed (use --restart, or a new --out)",
                rec_path.display(),
                i + 1,
                row.id,
                first
            );
            continue;
        }
        seen.insert(row.id.clone(), (rows.len(), i + 1));
        rows.push(row);
    }
    let truncate = (complete < bytes.len()).then_some(complete as u64);
    Ok((rows, truncate))
}

/// The bad cases in the metrics.json of `dir`; `None` when the run there has not finished.
pub(super) fn finished_bad_cases(dir: &Path) -> Result<Option<Vec<Problem>>> {
    let path = dir.join(METRICS_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let metrics: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let listed = metrics["bad_cases"]
        .as_array()
        .with_context(|| format!("{}: no bad_cases list", path.display()))?;
    listed
        .iter()
        .map(|p| match (p["id"].as_str(), p["reason"].as_str()) {
            (Some(id), Some(reason)) => Ok(Problem {
                id: id.to_string(),
                reason: reason.to_string(),
            }),
            _ => bail!("{}: a bad case without id or reason", path.display()),
        })
        .collect::<Result<_>>()
        .map(Some)
}

fn remove_if_present(p: &Path) -> Result<()> {
    match fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", p.display()))
        }
        _ => Ok(()),
    }
}

fn remove_outputs(out: &Path) -> Result<()> {
    for name in [RUN_FILE, RECORDS_FILE, SLICES_FILE, METRICS_FILE] {
        remove_if_present(&out.join(name))?;
    }
    let maps = out.join(MAPS_DIR);
    if maps.is_dir() {
        fs::remove_dir_all(&maps).with_context(|| format!("removing {}", maps.display()))?;
    }
    Ok(())
}

/// Appends finished slices to records.jsonl and slices.csv, each flushed and synced per batch.
pub(super) struct Sink {
    records: File,
    csv: File,
    records_path: PathBuf,
    csv_path: PathBuf,
    maps: Option<PathBuf>,
}

impl Sink {
    /// Starts the ledger in `out` (the job's [`Job::dir`]): discards earlier results on
    /// `--restart`, removes metrics.json, writes run.json, drops a partial last record line
    /// (`truncate`), rewrites slices.csv from the `rows` kept, and makes the maps folder when
    /// maps are saved.
    pub(super) fn start<'a>(
        job: &Job,
        out: &Path,
        run_json: &Value,
        truncate: Option<u64>,
        rows: impl Iterator<Item = &'a Row>,
    ) -> Result<Sink> {
        fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        if job.restart {
            remove_outputs(out)?;
        }
        remove_if_present(&out.join(METRICS_FILE))?;
        write_atomic(
            &out.join(RUN_FILE),
            serde_json::to_string_pretty(run_json)?.as_bytes(),
        )?;
        let records_path = out.join(RECORDS_FILE);
        if let Some(len) = truncate {
            let f = OpenOptions::new()
                .write(true)
                .open(&records_path)
                .with_context(|| format!("opening {}", records_path.display()))?;
            f.set_len(len).with_context(|| {
                format!(
                    "dropping the partial last line of {}",
                    records_path.display()
                )
            })?;
        }
        let csv_path = out.join(SLICES_FILE);
        write_atomic(&csv_path, csv_text(rows).as_bytes())?;
        let maps = job.save_maps.then(|| out.join(MAPS_DIR));
        if let Some(dir) = &maps {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(Sink {
            records: open_append(&records_path)?,
            csv: open_append(&csv_path)?,
            records_path,
            csv_path,
            maps,
        })
    }

    pub(super) fn append(&mut self, rows: &[Row], maps: &[&[f32]], size: usize) -> Result<()> {
        if let Some(dir) = &self.maps {
            for (r, a) in rows.iter().zip(maps) {
                let bytes = crate::outputs::slice_map_npy(a, size)?;
                write_atomic(&dir.join(format!("{}.npy", r.id)), &bytes)?;
            }
        }
        let mut lines = String::new();
        let mut csv = String::new();
        for r in rows {
            lines.push_str(&serde_json::to_string(r)?);
            lines.push('\n');
            csv.push_str(&r.csv_line());
            csv.push('\n');
        }
        for (f, text, path) in [
            (&mut self.records, &lines, &self.records_path),
            (&mut self.csv, &csv, &self.csv_path),
        ] {
            f.write_all(text.as_bytes())
                .and_then(|()| f.sync_data())
                .with_context(|| format!("appending to {}", path.display()))?;
        }
        Ok(())
    }
}

/// Rewrites slices.csv in id order and writes metrics.json with the bad cases and the
/// anomaly maps of the run with `key`.
pub(super) fn finish<'a>(
    out: &Path,
    key: &Value,
    rows: impl Iterator<Item = &'a Row>,
    evaluation: &Evaluation,
    bad: &[Problem],
) -> Result<()> {
    write_atomic(&out.join(SLICES_FILE), csv_text(rows).as_bytes())?;
    let mut metrics = serde_json::to_value(evaluation)?;
    metrics["anomaly_map"] = json!(anomaly_map(key));
    metrics["n_bad_cases"] = json!(bad.len());
    metrics["bad_cases"] = bad
        .iter()
        .map(|p| json!({"id": p.id, "reason": p.reason}))
        .collect();
    write_atomic(
        &out.join(METRICS_FILE),
        serde_json::to_string_pretty(&metrics)?.as_bytes(),
    )
}

fn open_append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}
