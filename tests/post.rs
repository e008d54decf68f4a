//! Post-processing and metrics against the numpy reference (tests/fixtures, written by
//! tools/make_fixtures.py) and against small cases worked out with numpy by hand.
//!
//! Everything here is compared exactly: normalisation, histogram matching and anomaly maps
//! repeat numpy's float32 operations one for one (no fused or reordered arithmetic), and
//! `numpy.interp` is reproduced with its own index choice on flat CDF runs, so there is no
//! rounding noise to allow for. Dice values are compared to 1e-12 only because the JSON
//! reader may be one ulp off when parsing decimal floats.

use fcd::io::npy::{read_array, read_slices, Slices};
use fcd::metrics::{
    dice, evaluate, mask_from_f32, mask_from_u8, nearest_peak_distance, peaks, slice_record,
};
use fcd::post::{
    anomaly_map, anomaly_map_batch, histogram_match, norm01, normalize_batch, normalize_slice,
};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn slices(name: &str) -> Slices {
    read_slices(&fixture(name)).unwrap_or_else(|e| panic!("{e:#}"))
}

fn count_diff(a: &[f32], b: &[f32]) -> usize {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count()
}

#[test]
fn normalisation_matches_fixture_exactly() {
    for (raw, norm) in [("flair_raw.npy", "x0.npy"), ("t1_raw.npy", "cond.npy")] {
        let raw = slices(raw);
        let want = slices(norm);
        let got = normalize_batch(&raw.data, raw.h * raw.w).unwrap();
        assert_eq!(count_diff(&got, &want.data), 0, "{norm}");
        assert!(got.iter().all(|v| (-1.0..=1.0).contains(v)));
    }
}

#[test]
fn histogram_matching_matches_numpy_exactly() {
    let x0 = slices("post_x0.npy");
    let xhat = slices("post_xhat.npy");
    let want = slices("post_matched.npy");
    let hw = x0.h * x0.w;
    for b in 0..x0.b {
        let r = b * hw..(b + 1) * hw;
        let got = histogram_match(&xhat.data[r.clone()], &x0.data[r.clone()]);
        assert_eq!(count_diff(&got, &want.data[r]), 0, "slice {b}");
    }
}

#[test]
fn anomaly_maps_match_numpy_exactly() {
    let x0 = slices("post_x0.npy");
    let xhat = slices("post_xhat.npy");
    let hw = x0.h * x0.w;
    for (file, hm) in [("anomaly_hm.npy", true), ("anomaly_nohm.npy", false)] {
        let want = slices(file);
        let got = anomaly_map_batch(&x0.data, &xhat.data, hw, hm).unwrap().0;
        assert_eq!(count_diff(&got, &want.data), 0, "{file}");
    }
}

/// A 6 x 6 case with zero backgrounds, computed with numpy 2.4:
/// `lut = np.interp(cdf_src, cdf_ref, range(256)).astype(np.uint8)`. Both images have 20
/// background pixels, so `cdf_src[0] = 20/36` equals the flat run `cdf_ref[0..=55]`; numpy
/// takes the run's last index (lut[0] = 55, not 0), and likewise lut[140] = 84.
#[test]
fn histogram_matching_follows_numpy_on_flat_cdf_runs() {
    #[rustfmt::skip]
    let reference: [f32; 36] = [
        0., 0., 0., 0., 0., 0.,
        0., 0., 3., 3., 0., 0.,
        0., 5., 5., 9., 2., 0.,
        0., 5., 7., 9., 2., 0.,
        0., 0., 3., 3., 0., 0.,
        0., 0., 0., 0., 0., 0.,
    ];
    #[rustfmt::skip]
    let source: [f32; 36] = [
        -1., -1., -1., -1., -1., -1.,
        -1., -1., 0.5, 0.25, -1., -1.,
        -1., 0.1, 0.2, 0.9, 0.3, -1.,
        -1., 0.1, 0.6, 1.0, 0.3, -1.,
        -1., -1., 0.4, 0.5, -1., -1.,
        -1., -1., -1., -1., -1., -1.,
    ];
    #[rustfmt::skip]
    let lut_of_source: [u8; 36] = [
        55, 55, 55, 55, 55, 55,
        55, 55, 197, 84, 55, 55,
        55, 84, 84, 254, 140, 55,
        55, 84, 254, 255, 140, 55,
        55, 55, 140, 197, 55, 55,
        55, 55, 55, 55, 55, 55,
    ];
    let matched: Vec<f32> = lut_of_source.iter().map(|&k| f32::from(k)).collect();
    assert_eq!(histogram_match(&source, &reference), norm01(&matched));
}

#[test]
fn normalisation_formula_and_errors() {
    let got = normalize_slice(&[2.0, 4.0, 3.0, 2.5]).unwrap();
    assert_eq!(got, vec![-1.0, 1.0, 0.0, -0.5]);

    let err = normalize_slice(&[3.0; 16]).unwrap_err().to_string();
    assert!(err.contains("constant slice (min = max = 3)"), "{err}");

    let err = normalize_slice(&[1.0, f32::NAN, 2.0])
        .unwrap_err()
        .to_string();
    assert!(err.contains("non-finite value at index 1"), "{err}");
    let err = normalize_slice(&[1.0, 2.0, f32::INFINITY])
        .unwrap_err()
        .to_string();
    assert!(err.contains("non-finite value at index 2"), "{err}");

    let mut stack = vec![0.0, 1.0, 2.0, 3.0];
    stack.extend([5.0; 4]);
    let err = format!("{:#}", normalize_batch(&stack, 4).unwrap_err());
    assert!(
        err.contains("slice 1") && err.contains("constant slice"),
        "{err}"
    );
    assert!(normalize_batch(&stack, 3).is_err());
}

#[test]
fn constant_inputs_give_zero_maps() {
    assert_eq!(norm01(&[7.0; 5]), vec![0.0; 5]);
    assert_eq!(norm01(&[1.0, 3.0, 2.0]), vec![0.0, 1.0, 0.5]);
    // A pseudo-healthy image identical to the original has no anomaly at all.
    let x = [0.0, 0.2, 0.9, 0.4, 0.0, 0.0];
    assert_eq!(anomaly_map(&x, &x, false), vec![0.0; 6]);
    assert_eq!(histogram_match(&x, &[]), vec![0.0; 6]);
}

#[test]
fn metrics_match_fixture() {
    let (shape, maps) = read_array(&fixture("metrics_maps.npy")).unwrap();
    let (mshape, masks) = read_array(&fixture("metrics_masks.npy")).unwrap();
    assert_eq!(shape, mshape);
    let (h, w) = (shape[1], shape[2]);
    let maps: Vec<f32> = maps.iter().map(|&v| v as f32).collect();
    let masks: Vec<f32> = masks.iter().map(|&v| v as f32).collect();
    let masks = mask_from_f32(&masks);
    let map_refs: Vec<&[f32]> = maps.chunks(h * w).collect();
    let mask_refs: Vec<&[bool]> = masks.chunks(h * w).collect();

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("metrics.json")).unwrap()).unwrap();
    let num = |k: &str| json[k].as_f64().unwrap();
    let (threshold, radius) = (num("threshold"), num("radius"));
    let (eval, records) = evaluate(&map_refs, &mask_refs, h, w, threshold, radius);

    let per_slice: Vec<f64> = records.iter().filter_map(|r| r.dice).collect();
    let want: Vec<f64> = json["per_slice_dice"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(per_slice.len(), want.len());
    for (g, w) in per_slice.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-12, "{g} vs {w}");
    }
    let n = eval.n_lesion_slices;
    assert_eq!(n, want.len());
    assert_eq!(eval.n_slices, shape[0]);
    assert!((eval.dice_at_threshold.unwrap() - num("dice_at_threshold")).abs() <= 1e-12);
    assert!((eval.dice_best.unwrap() - num("dice_best")).abs() <= 1e-12);
    // Thresholds are k/100 and rates are counts over n: compare the integers.
    let hundredths = |t: f64| (t * 100.0).round() as i64;
    assert_eq!(
        hundredths(eval.best_threshold.unwrap()),
        hundredths(num("best_threshold"))
    );
    let count = |r: f64| (r * n as f64).round() as i64;
    assert_eq!(count(eval.r_at_1.unwrap()), count(num("r_at_1")));
    assert_eq!(count(eval.r_at_5.unwrap()), count(num("r_at_5")));
    assert_eq!(count(eval.r_at_10.unwrap()), count(num("r_at_10")));

    for (i, rec) in records.iter().enumerate() {
        let want: Vec<(usize, usize)> = json["peaks"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p[0].as_u64().unwrap() as usize,
                    p[1].as_u64().unwrap() as usize,
                )
            })
            .collect();
        assert_eq!(rec.peaks, want, "peaks of slice {i}");
        assert_eq!(rec.peaks, peaks(map_refs[i], h, w, 10, radius));
    }
}

#[test]
fn dice_definition() {
    let a = [0.9, 0.5, 0.39, 0.0];
    let m = mask_from_u8(&[1, 0, 2, 0]);
    // P = {0, 1}, M = {0, 2}: 2 * 1 / (2 + 2).
    assert_eq!(dice(&a, &m, 0.4), 0.5);
    // 0.39f32 widens to 0.38999998569..., below the float64 threshold 0.39.
    assert_eq!(dice(&a, &m, 0.39), 0.5);
    assert_eq!(dice(&a, &m, 0.3), 2.0 * 2.0 / 5.0);
    assert_eq!(dice(&[0.1; 4], &[false; 4], 0.5), 1.0);
}

#[test]
fn peaks_ties_and_suppression_radius() {
    let (h, w) = (1, 40);
    let mut a = vec![0.0f32; w];
    a[3] = 1.0;
    a[30] = 1.0; // ties with a[3]: the first in row-major order wins
    a[13] = 0.9; // exactly 10 px from a[3]: suppressed (distance <= radius)
    a[14] = 0.8; // 11 px away: survives
    assert_eq!(peaks(&a, h, w, 3, 10.0), vec![(0, 3), (0, 30), (0, 14)]);
    // Once everything is suppressed the search stops short of k.
    assert_eq!(peaks(&a, h, w, 10, 10.0).len(), 3);
}

#[test]
fn recall_and_distances() {
    // One row: with radius 10 the greedy peaks after the two bright ones are the zeros at
    // columns 11, 22, 33, ... (each the first pixel left alive).
    let (h, w) = (1, 100);
    let mut a = vec![0.0f32; w];
    a[0] = 1.0;
    a[99] = 0.9;
    let mut mask = vec![false; w];
    mask[88] = true; // 11 px from peak 2
    let rec = slice_record(&a, &mask, h, w, 0.5, 10.0);
    assert_eq!(rec.peaks[..5], [(0, 0), (0, 99), (0, 11), (0, 22), (0, 33)]);
    assert_eq!(rec.peaks[9], (0, 88));
    assert_eq!(rec.recalled_at_1, Some(false));
    assert_eq!(rec.recalled_at_5, Some(false));
    assert_eq!(rec.recalled_at_10, Some(true));
    assert_eq!(rec.distance_at_1, Some(88.0));
    assert_eq!(rec.distance_at_5, Some(11.0));
    assert_eq!(rec.distance_at_10, Some(0.0));
    assert_eq!(rec.dice, Some(0.0));
    assert_eq!(nearest_peak_distance((0, 99), &mask, w), Some(11.0));

    mask[88] = false;
    mask[89] = true; // exactly 10 px from peak 2
    let rec = slice_record(&a, &mask, h, w, 0.5, 10.0);
    assert_eq!(rec.recalled_at_1, Some(false));
    assert_eq!(rec.recalled_at_5, Some(true));
    assert_eq!(rec.distance_at_5, Some(10.0));

    let healthy = slice_record(&a, &[false; 100], h, w, 0.5, 10.0);
    assert_eq!((healthy.dice, healthy.recalled_at_10), (None, None));
    assert_eq!(nearest_peak_distance((0, 0), &[false; 100], w), None);

    let (eval, _) = evaluate(&[&a, &a], &[&mask, &[false; 100]], h, w, 0.4, 10.0);
    assert_eq!((eval.n_slices, eval.n_lesion_slices), (2, 1));
    assert_eq!((eval.r_at_1, eval.r_at_5), (Some(0.0), Some(1.0)));
    let (eval, _) = evaluate(&[&a], &[&[false; 100]], h, w, 0.4, 10.0);
    assert_eq!(
        (eval.n_lesion_slices, eval.r_at_5, eval.dice_best),
        (0, None, None)
    );
}
