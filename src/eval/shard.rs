//! Which cases a shard of a sharded evaluation owns, and where its ledger lives.
//!
//! The rule: case `id` belongs to shard `FNV-1a-64(id) mod N`. It depends on the id alone, so
//! adding or removing a subject moves no other subject, a shard's set is the same in every
//! run (and its records resume), and no shard needs to see the others. Hashing rather than
//! cutting the sorted list into runs keeps that stability; the price is uneven shards when
//! there are few subjects per shard.

use super::rows::Fnv1a;
use anyhow::{bail, ensure, Context, Result};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Folder of `--out` that holds one folder per shard.
pub const SHARDS_DIR: &str = "shards";

/// Shard `index` of `count` (0-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub fn new(index: usize, count: usize) -> Result<Shard> {
        ensure!(count >= 1, "a shard count must be at least 1");
        ensure!(
            index < count,
            "shard {index} of {count}: shards are numbered 0 to {}",
            count - 1
        );
        Ok(Shard { index, count })
    }

    /// Whether case `id` is this shard's.
    pub fn owns(&self, id: &str) -> bool {
        let mut h = Fnv1a::new();
        h.update(id.as_bytes());
        h.0 % self.count as u64 == self.index as u64
    }

    /// This shard's folder under the output directory `out`.
    pub fn dir(&self, out: &Path) -> PathBuf {
        out.join(SHARDS_DIR)
            .join(format!("{}-of-{}", self.index, self.count))
    }

    /// The shard a folder name made by [`Shard::dir`] names.
    pub fn from_dir_name(name: &str) -> Option<Shard> {
        let (k, n) = name.split_once("-of-")?;
        Shard::new(k.parse().ok()?, n.parse().ok()?).ok()
    }

    /// The shard of a Slurm job-array task, from the variables `get` reads; `None` outside a
    /// job array. Task ids need not start at 0 but must be evenly spaced (`--array=1-8` or
    /// `0-30:3`, not `1,3,4`), so that each task maps to one shard and every shard to a task.
    pub fn from_slurm(get: impl Fn(&str) -> Option<String>) -> Result<Option<Shard>> {
        if get("SLURM_ARRAY_TASK_ID").is_none() {
            return Ok(None);
        }
        let var = |name: &str| -> Result<Option<usize>> {
            get(name)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .with_context(|| format!("{name}={v}: not a task number"))
                })
                .transpose()
        };
        let need = |name: &str| -> Result<usize> {
            var(name)?.with_context(|| format!("SLURM_ARRAY_TASK_ID is set but {name} is not"))
        };
        let id = need("SLURM_ARRAY_TASK_ID")?;
        let min = need("SLURM_ARRAY_TASK_MIN")?;
        let count = need("SLURM_ARRAY_TASK_COUNT")?;
        let step = var("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
        let max = var("SLURM_ARRAY_TASK_MAX")?;
        let spaced = id >= min
            && (id - min) % step == 0
            && max.is_none_or(|max| count >= 1 && max == min + (count - 1) * step);
        if !spaced {
            bail!(
                "job array task {id} (min {min}, count {count}, step {step}, max {}): the \
                 array's task ids must be evenly spaced, e.g. --array=1-{count}; or give --shard",
                max.map_or("unset".to_string(), |m| m.to_string())
            );
        }
        Shard::new((id - min) / step, count)
            .map(Some)
            .context("the job array's variables")
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = anyhow::Error;

    /// `K/N`: shard K (0-based) of N.
    fn from_str(s: &str) -> Result<Shard> {
        let parsed = s
            .split_once('/')
            .and_then(|(k, n)| Some((k.trim().parse().ok()?, n.trim().parse().ok()?)));
        let Some((k, n)) = parsed else {
            bail!("shard {s:?}: expected K/N, shard K (0-based) of N, e.g. 0/4");
        };
        Shard::new(k, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn every_case_has_exactly_one_shard() {
        let ids: Vec<String> = (0..200).map(|i| format!("sub-{i:03}")).collect();
        let shards: Vec<Shard> = (0..7).map(|k| Shard::new(k, 7).unwrap()).collect();
        let owner = |id: &str| -> Vec<usize> {
            shards
                .iter()
                .filter(|s| s.owns(id))
                .map(|s| s.index)
                .collect()
        };
        let owners: Vec<Vec<usize>> = ids.iter().map(|id| owner(id)).collect();
        assert!(owners.iter().all(|o| o.len() == 1));
        assert!((0..7).all(|k| owners.iter().any(|o| o[0] == k)));
    }

    /// The rule is part of the output format: shard folders of earlier runs resume only while
    /// it stays the same.
    #[test]
    fn the_partition_rule_is_pinned() {
        // FNV-1a-64("sub-01") = 0xf6f3_2b8a_fe4b_f47b, which is 3 mod 4.
        let owner: Vec<usize> = (0..4)
            .filter(|&k| Shard::new(k, 4).unwrap().owns("sub-01"))
            .collect();
        assert_eq!(owner, [3]);
    }

    #[test]
    fn shards_parse_and_name_their_folders() {
        let s: Shard = "2/5".parse().unwrap();
        assert_eq!(s, Shard { index: 2, count: 5 });
        assert_eq!(s.to_string(), "2/5");
        let dir = s.dir(Path::new("out"));
        assert_eq!(dir, Path::new("out/shards/2-of-5"));
        let name = dir.file_name().unwrap().to_str().unwrap();
        assert_eq!(Shard::from_dir_name(name), Some(s));
        for bad in ["5/5", "1/0", "1", "a/2", "-1/3"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        assert_eq!(Shard::from_dir_name("3-of-3"), None);
    }

    fn slurm(vars: &[(&str, &str)]) -> Result<Option<Shard>> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Shard::from_slurm(|k| map.get(k).cloned())
    }

    #[test]
    fn slurm_array_variables_give_the_shard() {
        assert_eq!(slurm(&[]).unwrap(), None);
        let array = |id: &str, min: &str, count: &str, step: Option<&str>| {
            let mut v = vec![
                ("SLURM_ARRAY_TASK_ID", id),
                ("SLURM_ARRAY_TASK_MIN", min),
                ("SLURM_ARRAY_TASK_COUNT", count),
            ];
            v.extend(step.map(|s| ("SLURM_ARRAY_TASK_STEP", s)));
            slurm(&v)
        };
        // --array=1-4: task 3 is shard 2 of 4.
        assert_eq!(
            array("3", "1", "4", None).unwrap(),
            Some(Shard { index: 2, count: 4 })
        );
        // --array=0-30:10: task 20 is shard 2 of 4.
        assert_eq!(
            array("20", "0", "4", Some("10")).unwrap(),
            Some(Shard { index: 2, count: 4 })
        );
        assert!(array("5", "1", "4", None).is_err());
        assert!(array("3", "1", "x", None).is_err());
        // --array=1,3,4: uneven ids are refused rather than mapped to the wrong shards.
        let uneven = slurm(&[
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_MAX", "4"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
            ("SLURM_ARRAY_TASK_STEP", "1"),
        ]);
        assert!(uneven.unwrap_err().to_string().contains("evenly spaced"));
        let missing = slurm(&[("SLURM_ARRAY_TASK_ID", "3")]).unwrap_err();
        assert!(missing.to_string().contains("SLURM_ARRAY_TASK_MIN"));
    }
}
