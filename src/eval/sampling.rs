//! The sampling part of a run: the calling thread prepares the cases and cuts their slices
//! into batches, and one worker thread per engine (a GPU each, or CPU workers; one for the
//! FLAIR baseline) takes the next batch as it frees up and hands its rows to the ledger. Which worker ran a batch, and in
//! which order batches finished, changes nothing in slices.csv or metrics.json: a slice's
//! noise comes from its id, and both files are written in id order at the end.

use super::ledger::Sink;
use super::rows::{case_slice_ids, slice_id, slice_seed, Row};
use super::{Event, Job, Maps, Sampling, Settings};
use crate::engine::{seeded_noise, DetectOptions, Engine};
use crate::inputs::{self, Prepared};
use crate::io::dataset::{Case, Problem};
use crate::post;
use crate::slices::SliceRange;
use crate::tensor::Tensor;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

/// One slice ready for the sampler: raw values at network size and its mask.
struct Slice {
    id: String,
    flair: Vec<f32>,
    t1: Vec<f32>,
    mask: Vec<bool>,
}

/// What the workers produced.
pub(super) struct Sampled {
    pub rows: Vec<Row>,
    /// Cases that could not be prepared.
    pub bad: Vec<Problem>,
}

/// The state the workers share: the ledger and the rows it was given.
struct Collected<'a> {
    sink: &'a mut Sink,
    rows: Vec<Row>,
}

/// Evaluates every slice of `cases` not in `done`, `batch` at a time, with anomaly maps from
/// `maps`, with `job`'s settings, telling its `events` how it goes.
pub(super) fn sample(
    maps: &mut Maps,
    job: &Job,
    size: usize,
    batch: usize,
    cases: &[Case],
    done: &BTreeMap<String, Row>,
    sink: &mut Sink,
) -> Result<Sampled> {
    let (s, events) = (&job.settings, job.events);
    let todo = cases
        .iter()
        .flat_map(|c| case_slice_ids(c, s.slices))
        .filter(|id| !done.contains_key(id))
        .count();
    events(Event::Start { slices: todo });
    let mappers: Vec<Mapper> = match maps {
        Maps::Diffusion { engines, sampling } => {
            let sampling: &Sampling = sampling;
            engines
                .iter_mut()
                .map(|engine| Mapper::Diffusion(engine, sampling))
                .collect()
        }
        Maps::Flair { .. } => vec![Mapper::Flair],
    };
    // One batch waiting per worker keeps every worker fed while cases are read.
    let (tx, rx) = sync_channel::<Vec<Slice>>(mappers.len());
    // The workers own the receiver: when the last one stops, sending fails and the producer
    // stops too.
    let rx = Arc::new(Mutex::new(rx));
    let collected = Mutex::new(Collected {
        sink,
        rows: Vec::new(),
    });
    let failed = AtomicBool::new(false);
    let mut bad = Vec::new();
    thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = mappers
            .into_iter()
            .map(|mapper| {
                let worker = Worker {
                    settings: s,
                    size,
                    jobs: Arc::clone(&rx),
                    collected: &collected,
                    failed: &failed,
                    events,
                };
                scope.spawn(move || worker.run(mapper))
            })
            .collect();
        drop(rx);
        let mut pending: Vec<Slice> = Vec::new();
        'cases: for case in cases {
            if failed.load(Ordering::Relaxed) {
                break;
            }
            let missing = case_slice_ids(case, s.slices)
                .iter()
                .filter(|id| !done.contains_key(*id))
                .count();
            if missing == 0 {
                continue;
            }
            match prepare(case, size, s.slices, |id| !done.contains_key(id)) {
                Ok(slices) => pending.extend(slices),
                Err(e) => {
                    let reason = format!("{e:#}");
                    events(Event::Skipped {
                        case: &case.id,
                        reason: &reason,
                        slices: missing,
                    });
                    bad.push(Problem {
                        id: case.id.clone(),
                        reason,
                    });
                }
            }
            while pending.len() >= batch {
                let rest = pending.split_off(batch);
                if tx.send(std::mem::replace(&mut pending, rest)).is_err() {
                    break 'cases;
                }
            }
        }
        if !pending.is_empty() {
            // An error here means every worker stopped, and their joins say why.
            let _ = tx.send(pending);
        }
        drop(tx);
        for w in workers {
            w.join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        }
        Ok(())
    })?;
    let rows = collected
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
        .rows;
    Ok(Sampled { rows, bad })
}

/// One sampling thread and what it shares with the others.
struct Worker<'a, 'b> {
    settings: &'a Settings,
    size: usize,
    jobs: Arc<Mutex<Receiver<Vec<Slice>>>>,
    collected: &'a Mutex<Collected<'b>>,
    failed: &'a AtomicBool,
    events: &'a (dyn Fn(Event) + Sync),
}

impl Worker<'_, '_> {
    /// Maps batches with `mapper` until there are none left or some worker failed.
    fn run(self, mapper: Mapper) -> Result<()> {
        loop {
            let next = self
                .jobs
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .recv();
            let Ok(batch) = next else {
                return Ok(());
            };
            if self.failed.load(Ordering::Relaxed) {
                return Ok(());
            }
            let done = self.one(&mapper, &batch);
            if done.is_err() {
                self.failed.store(true, Ordering::Relaxed);
                return done;
            }
        }
    }

    fn one(&self, mapper: &Mapper, batch: &[Slice]) -> Result<()> {
        let (size, s) = (self.size, self.settings);
        let maps = mapper.maps(size, batch)?;
        let maps: Vec<&[f32]> = maps.chunks_exact(size * size).collect();
        let new: Vec<Row> = batch
            .iter()
            .zip(&maps)
            .map(|(p, a)| Row::new(&p.id, a, &p.mask, size, s.threshold, s.radius))
            .collect();
        let mut c = self
            .collected
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        c.sink.append(&new, &maps, size)?;
        c.rows.extend(new);
        (self.events)(Event::Done {
            slices: batch.len(),
        });
        Ok(())
    }
}

/// What turns a batch of slices into anomaly maps, one per worker.
enum Mapper<'a> {
    /// The guided sampler on an engine.
    Diffusion(&'a mut Engine, &'a Sampling),
    /// The FLAIR baseline.
    Flair,
}

impl Mapper<'_> {
    /// The anomaly maps of `batch`, `[B, size, size]`.
    fn maps(&self, size: usize, batch: &[Slice]) -> Result<Vec<f32>> {
        match self {
            Mapper::Diffusion(engine, sampling) => sample_batch(engine, sampling, size, batch),
            // norm01 of the normalised slice: the FLAIR term of the anomaly map (SPEC 7).
            Mapper::Flair => batch.iter().try_fold(Vec::new(), |mut maps, p| {
                maps.extend(post::norm01(&post::normalize_slice(&p.flair)?));
                Ok(maps)
            }),
        }
    }
}

/// The slices of `case` that `wanted` selects; every slice of the case is checked so that a
/// case is good or bad as a whole.
fn prepare(
    case: &Case,
    size: usize,
    range: SliceRange,
    wanted: impl Fn(&str) -> bool,
) -> Result<Vec<Slice>> {
    let p: Prepared = inputs::read(&case.flair, &case.t1, case.roi.as_deref(), range, size)?;
    let hw = size * size;
    let ids: Vec<String> = match p.origin {
        inputs::Origin::Volume { range, .. } => (range.first..=range.last)
            .map(|z| slice_id(&case.id, z))
            .collect(),
        _ => vec![case.id.clone()],
    };
    Ok(ids
        .into_iter()
        .enumerate()
        .filter(|(_, id)| wanted(id))
        .map(|(i, id)| {
            let part = i * hw..(i + 1) * hw;
            Slice {
                id,
                flair: p.flair.data[part.clone()].to_vec(),
                t1: p.t1.data[part.clone()].to_vec(),
                mask: match &p.mask {
                    Some(m) => m[part].to_vec(),
                    None => vec![false; hw],
                },
            }
        })
        .collect())
}

/// Samples one batch; returns its anomaly maps (`[B, size, size]`).
fn sample_batch(engine: &Engine, s: &Sampling, size: usize, batch: &[Slice]) -> Result<Vec<f32>> {
    let shape = vec![batch.len(), size, size, 1];
    let gather = |f: fn(&Slice) -> &[f32]| batch.iter().flat_map(f).copied().collect();
    let noise: Vec<f32> = batch
        .iter()
        .flat_map(|p| seeded_noise(&[1, size, size, 1], slice_seed(s.seed, &p.id)).data)
        .collect();
    let prepared = Prepared {
        origin: inputs::Origin::Slices,
        flair: Tensor::new(shape.clone(), gather(|p| &p.flair))?,
        t1: Tensor::new(shape.clone(), gather(|p| &p.t1))?,
        mask: None,
    };
    let det = engine
        .detect_prepared(
            &prepared,
            DetectOptions {
                steps: Some(s.steps),
                guidance: Some(s.guidance),
                noise: Some(Tensor::new(shape, noise)?),
                hist_match: s.hist_match,
                batch: Some(batch.len()),
                ..Default::default()
            },
        )
        .with_context(|| {
            format!(
                "sampling slices {}..{}",
                batch[0].id,
                batch[batch.len() - 1].id
            )
        })?;
    Ok(det.anomaly.data)
}
