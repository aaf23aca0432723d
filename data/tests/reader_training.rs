//! The memory-mapped reader and the training / evaluation orders, on shards preprocessed from
//! synthetic data (rows compared with the Parquet contents read by `shard::read_examples`).
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use overfill_data::filter::Example as ShardRow;
use overfill_data::manifest::{Manifest, ShardEntry, SplitEntry};
use overfill_data::order::{epoch_batches, eval_batches, micro_batches, steps_per_epoch};
use overfill_data::preprocess::run_preprocess;
use overfill_data::reader::cache::CACHE_DIR;
use overfill_data::reader::{ShardDataset, Split};
use overfill_data::recipe::ValSize;
use overfill_data::shard::{read_examples, ShardWriter};
use overfill_data::synth::{write_dataset, write_tiny_tokenizer, SynthFormat, SynthOptions};

/// Preprocess `rows` synthetic rows (OpenHermes JSON, tiny tokenizer) into `tmp/name`, with
/// `val` validation rows and small shards so a split spans several files.
fn preprocess(tmp: &Path, name: &str, rows: usize, seed: u64, val: u64) -> PathBuf {
    let tok = tmp.join("tok");
    if !tok.join("tokenizer.json").is_file() {
        write_tiny_tokenizer(&tok).unwrap();
    }
    let input = tmp.join(format!("{name}.json"));
    write_dataset(&input, SynthFormat::OpenHermes, &SynthOptions { rows, seed, ..SynthOptions::default() }).unwrap();
    let out = tmp.join(name);
    let mut config = common::config(&[&input], &tok, &out);
    config.val_size = ValSize::Count(val);
    config.rows_per_shard = 40;
    run_preprocess(&config).unwrap();
    out
}

/// The split's rows as stored in its Parquet shards, in manifest order.
fn parquet_rows(dir: &Path, split: Split) -> Vec<ShardRow> {
    let manifest = Manifest::load(dir).unwrap();
    let entry = if split == Split::Train { &manifest.train } else { &manifest.val };
    entry.shards.iter().flat_map(|s| read_examples(&dir.join(&s.file)).unwrap()).collect()
}

fn assert_rows_match_parquet(dir: &Path, split: Split) -> usize {
    let data = ShardDataset::open_split(dir, split).unwrap();
    let expected = parquet_rows(dir, split);
    assert_eq!(data.len(), expected.len());
    for (i, row) in expected.iter().enumerate() {
        let got = data.get(i).unwrap();
        assert_eq!((got.row_id, &got.source), (row.row_id, &row.source), "row {i}");
        assert_eq!(data.context_ids(i), &row.context_ids[..], "row {i}");
        assert_eq!(data.target_ids(i), &row.target_ids[..], "row {i}");
        assert_eq!(got.context_ids, row.context_ids);
        assert_eq!(got.target_ids, row.target_ids);
        assert_eq!(data.ids(i), [&row.context_ids[..], &row.target_ids[..]].concat());
        assert_eq!(data.total_len(i), row.context_ids.len() + row.target_ids.len());
        assert_eq!((data.context_len(i), data.target_len(i)), (row.context_ids.len(), row.target_ids.len()));
        assert_eq!(data.row_id(i), row.row_id);
    }
    assert!(data.get(data.len()).is_none());
    // The seeded shuffle order of preprocessing is by (shuffle key, row id).
    let mut by_key: Vec<usize> = (0..expected.len()).collect();
    by_key.sort_by_key(|&i| (expected[i].shuffle_key, expected[i].row_id));
    assert_eq!(data.shuffled_order(), by_key);
    data.len()
}

fn cache_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join(CACHE_DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    names.sort();
    names
}

fn cache_file(dir: &Path, split: &str, ext: &str) -> PathBuf {
    let name = cache_files(dir).into_iter().find(|n| n.starts_with(&format!("{split}-")) && n.ends_with(ext)).unwrap();
    dir.join(CACHE_DIR).join(name)
}

#[test]
fn mapped_rows_equal_the_parquet_contents() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = preprocess(tmp.path(), "shards", 230, 3, 25);
    assert!(Manifest::load(&dir).unwrap().train.shards.len() >= 2, "several shards");
    assert_eq!(assert_rows_match_parquet(&dir, Split::Train), 205);
    assert_eq!(assert_rows_match_parquet(&dir, Split::Val), 25);
    // One token file and one index per split; opening again reuses them untouched.
    let files = cache_files(&dir);
    assert_eq!(files.len(), 4, "{files:?}");
    assert!(files.iter().filter(|n| n.starts_with("train-")).count() == 2 && files.iter().any(|n| n.ends_with(".tokens")));
    let index = cache_file(&dir, "train", ".index");
    let modified = std::fs::metadata(&index).unwrap().modified().unwrap();
    let again = ShardDataset::open(&dir).unwrap();
    assert_eq!(std::fs::metadata(&index).unwrap().modified().unwrap(), modified);
    assert_eq!(cache_files(&dir), files);
    // Calibration samples keep their meaning: the first rows of the shuffle order, truncated.
    let first = again.shuffled_order()[0];
    assert_eq!(again.calibration_samples(3, 20)[0], again.ids(first)[..again.total_len(first).min(20)].to_vec());
}

#[test]
fn ranks_opening_at_once_get_the_same_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = preprocess(tmp.path(), "shards", 120, 9, 0);
    let rows: Vec<Vec<Vec<u32>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let data = ShardDataset::open(&dir).unwrap();
                    (0..data.len()).map(|i| data.ids(i).to_vec()).collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(rows[0].len(), 120);
    assert!(rows.iter().all(|r| r == &rows[0]));
    assert_rows_match_parquet(&dir, Split::Train);
    // No temporary files left behind.
    assert!(cache_files(&dir).iter().all(|n| !n.contains(".tmp")), "{:?}", cache_files(&dir));
}

#[test]
fn an_empty_split_opens_with_no_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = preprocess(tmp.path(), "shards", 30, 1, 0);
    let val = ShardDataset::open_split(&dir, Split::Val).unwrap();
    assert_eq!(val.len(), 0);
    assert!(val.is_empty() && val.get(0).is_none());
    assert!(epoch_batches(&val, 1, 0, 4, 8).is_empty());
    assert!(eval_batches(&val, 4, 0).is_empty());
    assert!(val.calibration_samples(5, 10).is_empty());
    assert_eq!(steps_per_epoch(val.len(), 4), 0);
}

#[test]
fn the_cache_is_rebuilt_after_the_shards_change() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = preprocess(tmp.path(), "shards", 100, 1, 0);
    let before = ShardDataset::open(&dir).unwrap();
    let old_ids: Vec<Vec<u32>> = (0..before.len()).map(|i| before.ids(i).to_vec()).collect();
    let old_files = cache_files(&dir);
    // Preprocess other rows into the same folder (new manifest key, new shards).
    let input = tmp.path().join("shards.json");
    write_dataset(&input, SynthFormat::OpenHermes, &SynthOptions { rows: 130, seed: 2, ..SynthOptions::default() }).unwrap();
    let mut config = common::config(&[&input], &tmp.path().join("tok"), &dir);
    config.rows_per_shard = 40;
    run_preprocess(&config).unwrap();
    assert_eq!(assert_rows_match_parquet(&dir, Split::Train), 130);
    let new_files = cache_files(&dir);
    assert_eq!(new_files.len(), 2, "the old cache is removed: {new_files:?}");
    assert!(new_files.iter().all(|n| !old_files.contains(n)));
    // A dataset opened before keeps reading its own (unlinked) map.
    assert_eq!((0..before.len()).map(|i| before.ids(i).to_vec()).collect::<Vec<_>>(), old_ids);

    // Same manifest, a shard file rewritten with other tokens (same counts): rebuilt too.
    let manifest = Manifest::load(&dir).unwrap();
    let shard = dir.join(&manifest.train.shards[0].file);
    let rewrite = |rows: &[ShardRow]| {
        std::thread::sleep(std::time::Duration::from_millis(20)); // a later modification time
        let mut writer = ShardWriter::create(&shard).unwrap();
        writer.write(rows).unwrap();
        writer.finish(None).unwrap();
    };
    let mut rows = read_examples(&shard).unwrap();
    rows[0].context_ids[0] += 1;
    rewrite(&rows);
    assert_eq!(ShardDataset::open(&dir).unwrap().context_ids(0)[0], rows[0].context_ids[0]);
    assert_rows_match_parquet(&dir, Split::Train);
    // Shards that no longer match the manifest's counts: a clear error, not wrong rows.
    let extra = rows[0].target_ids[0];
    rows[0].target_ids.push(extra);
    rewrite(&rows);
    let err = format!("{:#}", ShardDataset::open(&dir).err().expect("the manifest's token count no longer matches"));
    assert!(err.contains("the manifest says") && err.contains("preprocess again"), "{err}");
}

#[test]
fn a_truncated_or_damaged_cache_is_rebuilt() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = preprocess(tmp.path(), "shards", 90, 4, 0);
    ShardDataset::open(&dir).unwrap();
    for (ext, damage) in [(".tokens", "truncate"), (".index", "truncate"), (".index", "header"), (".tokens", "extend"), (".index", "record")] {
        let path = cache_file(&dir, "train", ext);
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let len = file.metadata().unwrap().len();
        match damage {
            "truncate" => file.set_len(len - 4).unwrap(),
            "extend" => file.set_len(len + 4).unwrap(),
            "record" => {
                // The second row's token start (after the 64-byte header and one 40-byte record).
                use std::io::{Seek, SeekFrom, Write};
                (&file).seek(SeekFrom::Start(64 + 40)).unwrap();
                (&file).write_all(&7u64.to_le_bytes()).unwrap();
            }
            _ => {
                use std::io::Write;
                (&file).write_all(b"garbage!").unwrap();
            }
        }
        drop(file);
        assert_eq!(assert_rows_match_parquet(&dir, Split::Train), 90, "after {damage} of {ext}");
        assert_eq!(std::fs::metadata(cache_file(&dir, "train", ext)).unwrap().len(), len, "rebuilt whole");
    }
}

#[test]
fn the_epoch_plan_is_a_pure_function_of_seed_and_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = preprocess(tmp.path(), "shards", 150, 6, 0);
    let a = ShardDataset::open(&dir).unwrap();
    let b = ShardDataset::open(&dir).unwrap();
    let plan = epoch_batches(&a, 42, 0, 4, 8);
    assert_eq!(plan, epoch_batches(&a, 42, 0, 4, 8));
    assert_eq!(plan, epoch_batches(&b, 42, 0, 4, 8), "another open of the same shards");
    assert_ne!(plan, epoch_batches(&a, 42, 1, 4, 8));
    assert_ne!(plan, epoch_batches(&a, 43, 0, 4, 8));
    assert_eq!(plan.len(), steps_per_epoch(a.len(), 4));
    for epoch in 0..3 {
        for rows in [1, 4, 7, 16] {
            let batches = epoch_batches(&a, 42, epoch, rows, 8);
            assert_eq!(batches.len(), steps_per_epoch(150, rows));
            let mut all: Vec<usize> = batches.concat();
            all.sort_unstable();
            assert_eq!(all, (0..150).collect::<Vec<_>>(), "every row once in epoch {epoch}");
            assert!(batches[..batches.len() - 1].iter().all(|b| b.len() == rows));
        }
    }
    // Length grouping: rows in a batch are closer in length than random rows.
    let spread = |batches: &[Vec<usize>]| -> usize {
        batches.iter().map(|b| b.iter().map(|&i| a.total_len(i)).max().unwrap() - b.iter().map(|&i| a.total_len(i)).min().unwrap()).sum()
    };
    let ungrouped = epoch_batches(&a, 42, 0, 4, 1);
    assert!(spread(&plan) * 2 < spread(&ungrouped), "{} vs {}", spread(&plan), spread(&ungrouped));

    // The same global batches for (world 1, accum 2, 2 rows), (world 2, accum 1, 2 rows) and
    // (world 1, accum 1, 4 rows): global batch 4 in all three, and micro-batches partition it.
    for global in &plan {
        let mut expected = global.clone();
        expected.sort_unstable();
        for (world, accum, per_device) in [(1, 2, 2), (2, 1, 2), (1, 1, 4)] {
            let mut union: Vec<usize> = Vec::new();
            for rank in 0..world {
                let micro = micro_batches(&a, global, rank, world, accum);
                assert_eq!(micro.len(), accum);
                assert!(micro.iter().all(|m| m.len() <= per_device));
                union.extend(micro.concat());
            }
            union.sort_unstable();
            assert_eq!(union, expected, "world {world}, accumulation {accum}");
        }
        // Sorted by length: the first accumulation step holds the longer rows.
        let steps = micro_batches(&a, global, 0, 1, 2);
        if let (Some(short), Some(long)) = (steps[1].iter().map(|&i| a.total_len(i)).max(), steps[0].iter().map(|&i| a.total_len(i)).min()) {
            assert!(short <= long);
        }
    }
}

#[test]
fn eval_batches_are_fixed_longest_first() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = preprocess(tmp.path(), "shards", 80, 8, 30);
    let val = ShardDataset::open_split(&dir, Split::Val).unwrap();
    let all = eval_batches(&val, 8, 0);
    assert_eq!(all.len(), 4);
    let order: Vec<usize> = all.concat();
    let mut expected: Vec<usize> = (0..30).collect();
    expected.sort_by_key(|&i| (std::cmp::Reverse(val.total_len(i)), i));
    assert_eq!(order, expected);
    assert!(order.windows(2).all(|w| val.total_len(w[0]) >= val.total_len(w[1])));
    let first = eval_batches(&val, 8, 10);
    let mut rows: Vec<usize> = first.concat();
    rows.sort_unstable();
    assert_eq!(rows, (0..10).collect::<Vec<_>>());
    assert_eq!(first, eval_batches(&ShardDataset::open_split(&dir, Split::Val).unwrap(), 8, 10));
}

// --- Memory: a split of ~50 MB of tokens is opened without reading it into memory ---------------

const RSS_CHILD_ENV: &str = "OVERFILL_TEST_RSS_CHILD_DIR";
const BIG_ROWS: usize = 5400;
const BIG_ROW_TOKENS: usize = 2500;

fn vm_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn big_row(i: usize) -> ShardRow {
    let context_len = 500 + i % 1000;
    let ids: Vec<u32> = (0..BIG_ROW_TOKENS).map(|j| ((i * 7919 + j * 31) % 60_000) as u32).collect();
    ShardRow {
        row_id: i as u64,
        source: if i.is_multiple_of(3) { "a".into() } else { "b".into() },
        context_ids: ids[..context_len].to_vec(),
        target_ids: ids[context_len..].to_vec(),
        content_hash: i as u64,
        shuffle_key: (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        truncated: false,
    }
}

/// A manifest of a real (small) preprocess run whose train split is replaced by big shards.
fn write_big_split(tmp: &Path) -> PathBuf {
    let dir = preprocess(tmp, "big", 20, 1, 0);
    let mut manifest = Manifest::load(&dir).unwrap();
    let mut split = SplitEntry::default();
    for (k, chunk) in (0..BIG_ROWS).collect::<Vec<_>>().chunks(1000).enumerate() {
        let rows: Vec<ShardRow> = chunk.iter().map(|&i| big_row(i)).collect();
        let file = format!("train-big-{k:05}.parquet");
        let mut writer = ShardWriter::create(&dir.join(&file)).unwrap();
        writer.write(&rows).unwrap();
        writer.finish(None).unwrap();
        let context_tokens: u64 = rows.iter().map(|r| r.context_ids.len() as u64).sum();
        let target_tokens: u64 = rows.iter().map(|r| r.target_ids.len() as u64).sum();
        let bytes = std::fs::metadata(dir.join(&file)).unwrap().len();
        split.rows += rows.len() as u64;
        split.context_tokens += context_tokens;
        split.target_tokens += target_tokens;
        split.shards.push(ShardEntry { file, rows: rows.len() as u64, bytes, context_tokens, target_tokens });
    }
    manifest.train = split;
    manifest.save(&dir).unwrap();
    dir
}

#[test]
fn memory_does_not_grow_with_the_split() {
    if vm_rss_kb().is_none() {
        eprintln!("SKIP: /proc/self/status is not readable here");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_big_split(tmp.path());
    // Build the cache here; the child then measures opening it.
    let data = ShardDataset::open(&dir).unwrap();
    assert_eq!(data.len(), BIG_ROWS);
    for i in [0, 1, 999, 1000, 2718, BIG_ROWS - 1] {
        let row = big_row(i);
        assert_eq!((data.context_ids(i), data.target_ids(i)), (&row.context_ids[..], &row.target_ids[..]));
        assert_eq!(data.get(i).unwrap().source, row.source);
    }
    drop(data);
    let token_bytes = BIG_ROWS * BIG_ROW_TOKENS * 4;
    assert!(token_bytes >= 50 << 20);

    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "rss_child", "--nocapture", "--test-threads=1"])
        .env(RSS_CHILD_ENV, &dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let value = |key: &str| -> u64 {
        stdout.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_else(|| panic!("no {key} in {stdout}")).trim().parse().unwrap()
    };
    let (open_kb, scan_kb) = (value("rss_growth_open_kb "), value("rss_growth_scan_kb "));
    eprintln!("RSS growth: {open_kb} kB after open + index walk + epoch plan, {scan_kb} kB after reading every token; {} kB of tokens", token_bytes / 1024);
    assert!(open_kb * 1024 < token_bytes as u64 / 10, "open grew RSS by {open_kb} kB");
    // The measurement sees mapped pages once they are touched (so the bound above means something).
    assert!(scan_kb * 1024 > token_bytes as u64 / 2, "a full scan grew RSS by only {scan_kb} kB");
}

/// Runs only as the child of `memory_does_not_grow_with_the_split`.
#[test]
fn rss_child() {
    let Some(dir) = std::env::var_os(RSS_CHILD_ENV) else { return };
    let before = vm_rss_kb().unwrap();
    let data = ShardDataset::open(&dir).unwrap();
    let lengths: usize = (0..data.len()).map(|i| data.total_len(i)).sum();
    let plan = epoch_batches(&data, 1, 0, 16, 64);
    let after_open = vm_rss_kb().unwrap();
    assert_eq!(lengths, BIG_ROWS * BIG_ROW_TOKENS);
    assert_eq!(plan.len(), BIG_ROWS / 16 + 1);
    let checksum: u64 = (0..data.len()).map(|i| data.ids(i).iter().map(|&t| t as u64).sum::<u64>()).sum();
    let after_scan = vm_rss_kb().unwrap();
    println!("checksum {checksum}");
    println!("rss_growth_open_kb {}", after_open.saturating_sub(before));
    println!("rss_growth_scan_kb {}", after_scan.saturating_sub(before));
}
