//! TensorBoard event files for a run folder, written through `tboard` (record framing, CRCs and
//! the protobuf types). Only rank 0 writes.
//!
//! Every `EventWriter` opens a new file; TensorBoard merges the files of a folder in name order.
//! A resumed run first writes a SessionLog START at its first step, which makes TensorBoard's
//! readers drop the events at and after that step that the interrupted run left in older files
//! (without it `EventAccumulator` shows those steps twice).
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tboard::tensorboard::{
    event::What, session_log::SessionStatus, summary, summary_metadata::PluginData, DataClass,
    DataType, SessionLog, Summary, SummaryMetadata, TensorProto,
};

const FILE_PREFIX: &str = "events.out.tfevents.";

/// TensorBoard event file for one run folder (only rank 0 writes). Each scalar is flushed so a
/// TensorBoard that is watching sees it at once and a killed run loses nothing already logged.
pub struct EventWriter {
    /// tboard writes each record straight to the file (no user-space buffer).
    writer: tboard::EventWriter<File>,
    /// A second handle on the same file, for `sync_data` in `flush`.
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// Opens a new event file `events.out.tfevents.<secs>.<host>.<pid>.<n>` in `dir` (creating it).
    /// `resume_step = Some(s)`: s is the first step this run logs; a SessionLog START at step s is
    /// written first so readers drop the events at steps >= s that an interrupted earlier run left
    /// in other files of the folder. (Events at step 0, such as the recipe text, are kept, so a
    /// resumed run should not write them again.)
    pub fn create(dir: &Path, resume_step: Option<u64>) -> Result<EventWriter> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the TensorBoard folder {}", dir.display()))?;
        let path = new_event_file_path(dir)?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating the event file {}", path.display()))?;
        let sync_handle = file
            .try_clone()
            .with_context(|| format!("opening the event file {}", path.display()))?;
        // `from_writer` writes the `file_version: "brain.Event:2"` record.
        let writer = tboard::EventWriter::from_writer(file, Some(path.clone()))
            .with_context(|| format!("writing the event file {}", path.display()))?;
        let mut events = EventWriter { writer, file: sync_handle, path };
        if let Some(step) = resume_step {
            let start = SessionLog {
                status: SessionStatus::Start.into(),
                checkpoint_path: String::new(),
                msg: format!("resumed at step {step}"),
            };
            events.write(step, What::SessionLog(start))?;
        }
        Ok(events)
    }

    /// The file this writer appends to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn scalar(&mut self, tag: &str, step: u64, value: f64) -> Result<()> {
        self.scalars(step, &[(tag, value)])
    }

    /// Several scalars of one step in one event (TensorBoard stores them as f32).
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let value = values
            .iter()
            .map(|&(tag, value)| summary::Value {
                tag: tag.to_string(),
                value: Some(summary::value::Value::SimpleValue(value as f32)),
                ..Default::default()
            })
            .collect();
        self.write(step, What::Summary(Summary { value }))
    }

    /// Markdown text (TensorBoard's text plugin), e.g. the resolved recipe at step 0.
    pub fn text(&mut self, tag: &str, step: u64, markdown: &str) -> Result<()> {
        // What `tensorboard.summary.text` writes: a scalar DT_STRING tensor tagged for the plugin.
        let metadata = SummaryMetadata {
            plugin_data: Some(PluginData {
                plugin_name: "text".to_string(),
                content: Vec::new(),
            }),
            data_class: DataClass::Tensor.into(),
            ..Default::default()
        };
        let tensor = TensorProto {
            dtype: DataType::DtString.into(),
            string_val: vec![markdown.as_bytes().to_vec()],
            ..Default::default()
        };
        let value = summary::Value {
            tag: tag.to_string(),
            metadata: Some(metadata),
            value: Some(summary::value::Value::Tensor(tensor)),
            ..Default::default()
        };
        self.write(step, What::Summary(Summary { value: vec![value] }))
    }

    /// Records already reach the file as they are written; this also makes them durable on disk
    /// (call it at checkpoints and at the end).
    pub fn flush(&mut self) -> Result<()> {
        self.writer
            .flush()
            .and_then(|()| self.file.sync_data().map_err(tboard::Error::from))
            .with_context(|| format!("flushing the event file {}", self.path.display()))
    }

    fn write(&mut self, step: u64, what: What) -> Result<()> {
        let step = i64::try_from(step).with_context(|| format!("step {step} is too large"))?;
        self.writer
            .write(step, what)
            .with_context(|| format!("writing the event file {}", self.path.display()))
    }
}

/// `events.out.tfevents.<secs>.<host>.<pid>.<n>`, named so that it sorts after every event file
/// already in `dir`: TensorBoard reads a folder's files in name order, and the resume purge only
/// works if the resumed run's file is read last. Two writers in the same second (a quick resume,
/// the tests) could otherwise sort the wrong way (`…pid.10` < `…pid.9`), so the seconds field is
/// moved past the newest existing file's in that case.
fn new_event_file_path(dir: &Path) -> Result<PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(1);

    let mut newest_existing: Option<String> = None;
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(FILE_PREFIX) && newest_existing.as_ref().is_none_or(|n| name > *n) {
            newest_existing = Some(name);
        }
    }
    let host = hostname::get()
        .context("reading the host name for the event file name")?
        .to_string_lossy()
        .into_owned();
    let pid = std::process::id();
    let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the system clock is before 1970")?
        .as_secs();
    let name_at = |secs: u64| format!("{FILE_PREFIX}{secs:010}.{host}.{pid}.{counter}");
    if let Some(newest) = newest_existing {
        let newest_secs = newest[FILE_PREFIX.len()..]
            .split('.')
            .next()
            .and_then(|s| s.parse::<u64>().ok());
        if let Some(newest_secs) = newest_secs {
            if name_at(secs) <= newest {
                secs = secs.max(newest_secs + 1);
            }
        }
    }
    Ok(dir.join(name_at(secs)))
}

/// `overfill debug-write-events` (hidden): writes the training scalars for steps 1..=N (from the
/// resume step when given) with made-up values, and the recipe text at step 0 on a fresh run, so
/// tests can read the files back with TensorBoard's own reader. Prints what it wrote as JSON.
#[derive(clap::Args)]
pub struct DebugWriteEventsArgs {
    /// The run folder.
    #[arg(long)]
    out: PathBuf,
    /// The last step written.
    #[arg(long)]
    steps: u64,
    /// Continue an interrupted run: the first step written (values differ from a fresh run's).
    #[arg(long)]
    resume_step: Option<u64>,
}

pub fn debug_write_events(args: DebugWriteEventsArgs) -> Result<()> {
    const TAGS: [&str; 6] = [
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_sec",
        "train/skipped_steps",
        "eval/loss",
    ];
    let mut events = EventWriter::create(&args.out, args.resume_step)?;
    let mut texts = Vec::new();
    if args.resume_step.is_none() {
        let markdown = "```toml\n[train]\nlr = 2e-5\n```";
        events.text("config/recipe", 0, markdown)?;
        texts.push(("config/recipe", 0, markdown));
    }
    let run_offset = args.resume_step.map_or(0.0, |s| 1000.0 * s as f64);
    let mut written = Vec::new();
    for step in args.resume_step.unwrap_or(1)..=args.steps {
        let mut values: Vec<(&str, f64)> = TAGS
            .iter()
            .enumerate()
            .map(|(k, &tag)| (tag, (k + 1) as f64 * (1.0 + 1.0 / (step as f64 + 3.0)) + run_offset))
            .collect();
        values.extend(crate::memory::process_memory().scalars());
        events.scalars(step, &values)?;
        written.extend(values.into_iter().map(|(tag, value)| (tag, step, value)));
    }
    events.flush()?;
    let report = serde_json::json!({
        "file": events.path(),
        "scalars": written,
        "texts": texts,
    });
    println!("{report}");
    Ok(())
}
