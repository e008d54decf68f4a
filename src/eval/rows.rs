//! Per-slice results: slice ids, noise seeds, records and their CSV lines.

use crate::io::dataset::{Case, CaseKind};
use crate::metrics::SliceCounts;
use crate::slices::SliceRange;
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

/// Header of slices.csv.
pub const CSV_HEADER: &str =
    "id,lesion,dice,nearest_1,nearest_5,nearest_10,recalled_1,recalled_5,recalled_10";

/// One slice's results as stored in records.jsonl: integers and booleans only, so that
/// reading them back loses nothing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub id: String,
    #[serde(flatten)]
    pub counts: SliceCounts,
}

impl Row {
    /// Evaluates one `size x size` anomaly map against its mask.
    pub fn new(
        id: &str,
        a: &[f32],
        mask: &[bool],
        size: usize,
        threshold: f64,
        radius: f64,
    ) -> Row {
        Row {
            id: id.to_string(),
            counts: SliceCounts::new(a, mask, size, size, threshold, radius),
        }
    }

    pub(super) fn check(&self) -> Result<()> {
        let checked = self.counts.check();
        ensure!(
            checked.is_ok(),
            "record {} holds {}",
            self.id,
            checked.unwrap_err()
        );
        Ok(())
    }

    pub(super) fn csv_line(&self) -> String {
        let c = &self.counts;
        let opt = |v: Option<String>| v.unwrap_or_default();
        let mut cells = vec![
            csv_field(&self.id),
            c.lesion_pixels.to_string(),
            opt(c.dice().map(|d| d.to_string())),
        ];
        cells.extend(
            c.nearest_sq
                .iter()
                .map(|d| opt(d.map(|d| (d as f64).sqrt().to_string()))),
        );
        cells.extend(
            c.recalled
                .iter()
                .map(|r| opt(r.map(|r| u8::from(r).to_string()))),
        );
        cells.join(",")
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// slices.csv for these rows.
pub(super) fn csv_text<'a>(rows: impl Iterator<Item = &'a Row>) -> String {
    let mut text = format!("{CSV_HEADER}\n");
    for r in rows {
        text.push_str(&r.csv_line());
        text.push('\n');
    }
    text
}

/// 64-bit FNV-1a, fed incrementally.
pub(super) struct Fnv1a(pub(super) u64);

impl Fnv1a {
    pub(super) fn new() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }

    pub(super) fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// The noise seed of slice `id`: FNV-1a over the run's seed (8 bytes, little-endian) followed
/// by the id's UTF-8 bytes.
pub fn slice_seed(seed: u64, id: &str) -> u64 {
    let mut h = Fnv1a::new();
    h.update(&seed.to_le_bytes());
    h.update(id.as_bytes());
    h.0
}

/// The id of axial slice `z` of NIfTI case `case`.
pub fn slice_id(case: &str, z: usize) -> String {
    format!("{case}_z{z:03}")
}

/// The slice ids a case yields when it is good.
pub fn case_slice_ids(case: &Case, range: SliceRange) -> Vec<String> {
    match case.kind {
        CaseKind::PngSlice => vec![case.id.clone()],
        CaseKind::NiftiSubject => (range.first..=range.last)
            .map(|z| slice_id(&case.id, z))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics;

    #[test]
    fn summary_from_counts_equals_metrics_evaluate() {
        let (h, w) = (16, 16);
        let mut maps = Vec::new();
        let mut masks = Vec::new();
        for s in 0..5u32 {
            let a: Vec<f32> = (0..h * w)
                .map(|i| {
                    ((i as u32).wrapping_mul(2654435761u32.wrapping_add(s)) % 1000) as f32 / 999.0
                })
                .collect();
            let m: Vec<bool> = (0..h * w)
                .map(|i| s != 2 && (i / w) % 5 == s as usize && i % w < 9)
                .collect();
            maps.push(a);
            masks.push(m);
        }
        let maps_ref: Vec<&[f32]> = maps.iter().map(|m| m.as_slice()).collect();
        let masks_ref: Vec<&[bool]> = masks.iter().map(|m| m.as_slice()).collect();
        let (want, recs) = metrics::evaluate(&maps_ref, &masks_ref, h, w, 0.4, 3.0);
        let rows: Vec<Row> = (0..5)
            .map(|i| Row::new(&format!("s{i}"), &maps[i], &masks[i], h, 0.4, 3.0))
            .collect();
        let back: Vec<Row> = rows
            .iter()
            .map(|r| serde_json::from_str(&serde_json::to_string(r).unwrap()).unwrap())
            .collect();
        assert_eq!(back, rows);
        let got = metrics::summarize(back.iter().map(|r| &r.counts), 0.4, 3.0);
        assert_eq!(got, want);
        for (r, rec) in back.iter().zip(&recs) {
            assert_eq!(r.counts.dice(), rec.dice);
            let d = r.counts.nearest_sq.map(|d| d.map(|d| (d as f64).sqrt()));
            assert_eq!(
                d,
                [rec.distance_at_1, rec.distance_at_5, rec.distance_at_10]
            );
        }
    }

    #[test]
    fn slice_seeds_are_stable_and_distinct() {
        assert_eq!(slice_seed(0, "a"), slice_seed(0, "a"));
        assert_ne!(slice_seed(0, "a"), slice_seed(1, "a"));
        assert_ne!(slice_seed(0, "a"), slice_seed(0, "b"));
        // FNV-1a 64 of the empty input is its offset basis.
        let mut h = Fnv1a::new();
        h.update(b"");
        assert_eq!(h.0, 0xcbf2_9ce4_8422_2325);
        h.update(b"a");
        assert_eq!(h.0, 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn csv_cells_of_healthy_and_lesion_rows() {
        let a: Vec<f32> = (0..64).map(|i| if i == 9 { 1.0 } else { 0.0 }).collect();
        let healthy = Row::new("h,1", &a, &[false; 64], 8, 0.4, 10.0);
        assert_eq!(healthy.csv_line(), "\"h,1\",0,,,,,,,");
        let mut m = [false; 64];
        m[9] = true;
        let lesion = Row::new("l", &a, &m, 8, 0.4, 10.0);
        assert_eq!(lesion.csv_line(), "l,1,1,0,0,0,1,1,1");
    }
}
