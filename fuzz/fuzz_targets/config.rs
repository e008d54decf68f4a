//! The diffusion YAML config: parsing and validation. A config that passes has every value
//! inside the bounds README.md ("Limits and errors") promises; they are restated here, not
//! taken from the validation under test.

#![no_main]

use fcd::config::{Config, NetConfig};
use fcd_fuzz::check_error;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|bytes: &[u8]| {
    // The file reader refuses a config that is not UTF-8 before parsing.
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    match Config::parse(text, Path::new("fuzz.yaml")) {
        Ok(c) => check_bounds(&c),
        Err(e) => check_error(&e),
    }
});

fn check_bounds(c: &Config) {
    check_net(&c.unet);
    check_net(&c.classifier);
    assert_eq!(c.unet.image_size, c.classifier.image_size);
    let s = c.schedule;
    assert!((1..=100_000).contains(&s.timesteps), "{s:?}");
    for x in [s.linear_start, s.linear_end] {
        assert!(x.is_finite() && x > 0.0 && x < 1.0, "{s:?}");
    }
    assert!(s.linear_start <= s.linear_end, "{s:?}");
    let d = c.defaults;
    assert!((1..=s.timesteps).contains(&d.noise_level), "{d:?}");
    assert!(
        d.guidance.is_finite() && d.guidance.abs() <= 1000.0,
        "{d:?}"
    );
}

fn check_net(n: &NetConfig) {
    let levels = n.channel_mult.len();
    assert!((1..=8).contains(&levels), "{n:?}");
    assert!((8..=1024).contains(&n.image_size), "{n:?}");
    assert_eq!(n.image_size % (1 << (levels - 1)), 0, "{n:?}");
    let mc = n.model_channels;
    assert!(mc > 0 && mc % 32 == 0 && mc <= 4096, "{n:?}");
    assert!((1..=8).contains(&n.num_res_blocks), "{n:?}");
    for k in [n.in_channels, n.out_channels, n.num_classes.unwrap_or(1)] {
        assert!((1..=4096).contains(&k), "{n:?}");
    }
    for (level, &m) in n.channel_mult.iter().enumerate() {
        let ch = m * mc;
        assert!((1..=4096).contains(&ch), "{n:?}");
        let attended = level == levels - 1 || n.attention_resolutions.contains(&(1 << level));
        if attended {
            // Whole heads: the head width (given, or the channels over the heads) divides
            // the layer, and there is at least one head.
            let width = match n.num_head_channels {
                w if w > 0 => w as usize,
                _ => ch / n.num_heads.max(1),
            };
            assert!(
                width >= 1 && ch % width == 0,
                "{n:?}: heads of {width} in {ch}"
            );
            assert!(n.heads(ch) * width == ch, "{n:?}");
        }
    }
}
