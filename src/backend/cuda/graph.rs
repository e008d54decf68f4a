//! `Backend::repeat` on the GPU: a sampler step recorded once as a CUDA
//! graph and replayed, one launch instead of hundreds per network pass,
//! with no allocation or host work.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use anyhow::{Context, Result};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode, CUstreamCaptureStatus};
use cudarc::driver::CudaGraph;

use super::Gpu;

/// Where `repeat` stands for one key.
enum Recording {
    /// Run once directly (which also loads every kernel it needs).
    Seen,
    /// Captured: replayed from now on.
    Graph(CudaGraph),
    /// Capture failed: run directly from now on.
    Direct,
}

// SAFETY: cudarc leaves `CudaGraph` without `Send` because it holds raw driver handles. They
// are process-wide: the driver takes them from any thread whose current context is theirs,
// and cudarc binds the graph's context before every call on it. `Graphs` is not `Sync`, so
// one thread at a time uses them; moving the backend (an engine) to another thread is sound.
unsafe impl Send for Recording {}

/// The recordings by key, whether to record at all, and how many recorded
/// steps have been launched.
pub(super) struct Graphs {
    recordings: RefCell<HashMap<usize, Recording>>,
    on: Cell<bool>,
    launches: Cell<usize>,
}

/// Whether `gpu`'s stream is being captured.
pub(super) fn capturing(gpu: &Gpu) -> bool {
    !matches!(
        gpu.stream().capture_status(),
        Ok(CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
    )
}

impl Graphs {
    pub fn new() -> Graphs {
        Graphs {
            recordings: RefCell::new(HashMap::new()),
            on: Cell::new(true),
            launches: Cell::new(0),
        }
    }

    pub fn set_on(&self, gpu: &Gpu, on: bool) {
        self.on.set(on);
        self.end(gpu);
    }

    pub fn launches(&self) -> usize {
        self.launches.get()
    }

    /// Whether no recording is held (so no graph reads a cached buffer).
    pub fn is_empty(&self) -> bool {
        self.recordings.borrow().is_empty()
    }

    /// The first call runs `body` directly, the second captures it as a
    /// CUDA graph and launches that, later ones launch the graph. A capture
    /// that fails (an op the graph cannot hold) falls back to direct runs,
    /// with a warning. `direct` (the reference backend, poisoned outputs)
    /// runs it directly every time.
    pub fn repeat(
        &self,
        gpu: &Gpu,
        direct: bool,
        key: usize,
        body: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        // Without stream-ordered allocation every allocation would break the
        // capture.
        if direct || !self.on.get() || !gpu.context().has_async_alloc() {
            return body();
        }
        let state = self.recordings.borrow_mut().remove(&key);
        let (result, next) = match state {
            None => (body(), Recording::Seen),
            Some(Recording::Direct) => (body(), Recording::Direct),
            Some(Recording::Graph(g)) => (self.launch(&g), Recording::Graph(g)),
            // The direct run's memory goes back to the pool before the
            // graph's own pool takes its working set.
            Some(Recording::Seen) => match gpu.synchronize().and_then(|()| record(gpu, body)) {
                Ok(g) => (self.launch(&g), Recording::Graph(g)),
                Err(e) => {
                    eprintln!(
                        "fcd: warning: recording sampler step {key} as a CUDA graph failed \
                         ({e:#}); running it kernel by kernel"
                    );
                    (body(), Recording::Direct)
                }
            },
        };
        self.recordings.borrow_mut().insert(key, next);
        result
    }

    /// Forgets every recording.
    pub fn end(&self, gpu: &Gpu) {
        let mut recordings = self.recordings.borrow_mut();
        if recordings
            .values()
            .any(|r| matches!(r, Recording::Graph(_)))
        {
            // Graphs are destroyed only once their last launch is done;
            // a fault it hit is reported by the caller's next sync.
            let _ = gpu.synchronize();
        }
        recordings.clear();
    }

    fn launch(&self, g: &CudaGraph) -> Result<()> {
        g.launch().context("launching a recorded sampler step")?;
        self.launches.set(self.launches.get() + 1);
        Ok(())
    }
}

/// Captures `body` as a CUDA graph and uploads it (nothing runs yet).
/// On any failure the stream is left out of capture mode, so that the
/// caller can run `body` directly.
fn record(gpu: &Gpu, body: &mut dyn FnMut() -> Result<()>) -> Result<CudaGraph> {
    let stream = gpu.stream();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .context("beginning a CUDA graph capture")?;
    let ran = body();
    // cudarc keeps errors raised in drops (a free refused by an
    // invalidated capture) and returns them from the next call, which
    // would make end_capture fail before it ends the capture.
    let dropped = gpu.context().check_err();
    // Allocations the step makes and frees are graph-owned; auto-free
    // covers any the capture would otherwise leave live between launches.
    let graph = stream
        .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
    if graph.is_err() {
        abandon_capture(gpu);
    }
    ran.context("recording the step")?;
    dropped.context("a buffer freed while recording")?;
    let graph = graph
        .context("ending the CUDA graph capture")?
        .context("the captured step is empty")?;
    graph.upload().context("uploading the recorded step")?;
    Ok(graph)
}

/// Ends a capture that `end_capture` could not, dropping its graph.
fn abandon_capture(gpu: &Gpu) {
    if !capturing(gpu) {
        return;
    }
    // SAFETY: this Gpu's live stream, capturing (checked above); a graph
    // it returns is ours to destroy and is not used afterwards.
    unsafe {
        if let Ok(g) = cudarc::driver::result::stream::end_capture(gpu.stream().cu_stream()) {
            if !g.is_null() {
                let _ = cudarc::driver::result::graph::destroy(g);
            }
        }
    }
    let _ = gpu.context().check_err();
}
