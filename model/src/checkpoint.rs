//! Hugging Face checkpoint directories: locating them (a path or a cached hub id), reading
//! `config.json` (+ `generation_config.json`) and safetensors weights (single file or sharded
//! with an index), and writing them back in the same layout.
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, View};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use crate::config::{parse_token_ids, ModelConfig};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The tokenizer and generation files a checkpoint folder carries beside its weights (every one
/// transformers may have saved, `chat_template.jinja` included): copied into every folder made
/// from another (a pruned model, a trained decoder).
pub const TOKENIZER_FILES: [&str; 8] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
];

/// The hub cache root: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE").filter(|s| !s.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    if let Some(home) = std::env::var_os("HF_HOME").filter(|s| !s.is_empty()) {
        return Ok(PathBuf::from(home).join("hub"));
    }
    let home = std::env::var_os("HOME")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            anyhow!(
                "cannot locate the Hugging Face cache: none of HF_HUB_CACHE, HF_HOME, HOME is set"
            )
        })?;
    Ok(PathBuf::from(home)
        .join(".cache")
        .join("huggingface")
        .join("hub"))
}

/// A checkpoint directory, or a hub id (`org/name`) looked up offline in the local HF cache
/// (the snapshot that `refs/main` points to).
pub fn resolve_model_dir(id_or_dir: &str) -> Result<PathBuf> {
    let path = Path::new(id_or_dir);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let looks_like_hub_id = id_or_dir.split('/').count() == 2
        && !id_or_dir.starts_with('.')
        && !id_or_dir.starts_with('/')
        && id_or_dir.split('/').all(|part| !part.is_empty());
    if !looks_like_hub_id {
        bail!("model {id_or_dir:?} is neither a directory nor a hub id of the form org/name");
    }
    let cache_dir = hub_cache_dir()?;
    let repo = hf_hub::Cache::new(cache_dir.clone()).model(id_or_dir.to_string());
    let config = repo.get("config.json").ok_or_else(|| {
        anyhow!(
            "model {id_or_dir:?} is not a directory and not in the local Hugging Face cache {} \
             (looked for models--{}/snapshots/<refs/main>/config.json; download it first, e.g. `hf download {id_or_dir}`)",
            cache_dir.display(),
            id_or_dir.replace('/', "--")
        )
    })?;
    let dir = config
        .parent()
        .ok_or_else(|| anyhow!("cached config {} has no parent", config.display()))?;
    Ok(dir.to_path_buf())
}

/// `config.json` of a checkpoint, with bos/eos taken from `generation_config.json` when present
/// (that file is what generation uses in transformers). Every reader of a model folder starts
/// here, so this is where a folder with a `file_digests.json` (the trainer's checkpoints and
/// `final/`) is refused when a listed file is missing or has another size.
pub fn load_config(dir: &Path) -> Result<ModelConfig> {
    crate::file_digests::check_sizes(dir)?;
    let path = dir.join("config.json");
    if !path.is_file() {
        bail!(
            "{} not found: not a Hugging Face checkpoint directory",
            path.display()
        );
    }
    let mut config = ModelConfig::from_file(&path)?;
    let gen_path = dir.join("generation_config.json");
    if gen_path.is_file() {
        let text = std::fs::read_to_string(&gen_path)
            .with_context(|| format!("cannot read {}", gen_path.display()))?;
        let gen: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", gen_path.display()))?;
        let eos = parse_token_ids(gen.get("eos_token_id"), "eos_token_id")
            .with_context(|| format!("in {}", gen_path.display()))?;
        if !eos.is_empty() {
            config.eos_token_ids = eos;
        }
        if let Some(bos) = gen.get("bos_token_id").and_then(Value::as_i64) {
            config.bos_token_id = Some(bos);
        }
    }
    Ok(config)
}

/// The safetensors files of a checkpoint: the shards named by the index, or the single file.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index_path = dir.join(INDEX_FILE);
    if index_path.is_file() {
        let text = std::fs::read_to_string(&index_path)
            .with_context(|| format!("cannot read {}", index_path.display()))?;
        let index: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index_path.display()))?;
        let map = index
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| anyhow!("{} has no \"weight_map\" object", index_path.display()))?;
        let mut files = BTreeSet::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| {
                anyhow!(
                    "{}: weight_map entry for {tensor} is not a file name",
                    index_path.display()
                )
            })?;
            files.insert(file.to_string());
        }
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        for p in &paths {
            if !p.is_file() {
                bail!(
                    "{} names shard {} which does not exist",
                    index_path.display(),
                    p.display()
                );
            }
        }
        return Ok(paths);
    }
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    bail!(
        "{} has neither {SINGLE_FILE} nor {INDEX_FILE}",
        dir.display()
    )
}

/// Names transformers ignores when loading (old checkpoints stored the rotary buffers).
fn is_ignored_tensor(name: &str, config: &ModelConfig) -> bool {
    name.ends_with("rotary_emb.inv_freq")
        || (config.tie_word_embeddings && name == "lm_head.weight")
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        other => bail!("cannot save tensors of kind {other:?}"),
    })
}

/// Reads and validates all weights: every tensor of `config.parameter_shapes()` must be present
/// once with its exact shape, and nothing else (bar ignored buffers). Tensors are converted to
/// `dtype` and moved to `device`.
pub fn load_tensors(
    dir: &Path,
    config: &ModelConfig,
    device: Device,
    dtype: Kind,
) -> Result<BTreeMap<String, Tensor>> {
    let expected: HashMap<String, Vec<i64>> = config.parameter_shapes().into_iter().collect();
    let files = weight_files(dir)?;
    let mut tensors = BTreeMap::new();
    for path in &files {
        let bytes = map_file(path)?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| {
            anyhow!(
                "{}: not a valid safetensors file (truncated or corrupt?): {e}",
                path.display()
            )
        })?;
        // Validate names and shapes of the whole file before converting anything.
        let mut names: Vec<&str> = st.names();
        names.sort();
        for name in &names {
            if is_ignored_tensor(name, config) {
                continue;
            }
            let view = st
                .tensor(name)
                .map_err(|e| anyhow!("{}: tensor {name}: {e}", path.display()))?;
            let Some(shape) = expected.get(*name) else {
                bail!(
                    "{}: unexpected tensor {name} (shape {:?}) for a {} model with {} layers",
                    path.display(),
                    view.shape(),
                    config.model_type.as_str(),
                    config.num_hidden_layers
                );
            };
            let actual: Vec<i64> = view.shape().iter().map(|&s| s as i64).collect();
            if &actual != shape {
                bail!(
                    "{}: tensor {name} has shape {actual:?}, expected {shape:?} from config.json",
                    path.display()
                );
            }
            if kind_of(view.dtype()).is_none() {
                bail!(
                    "{}: tensor {name} has unsupported dtype {:?}",
                    path.display(),
                    view.dtype()
                );
            }
            if tensors.contains_key(*name) {
                bail!(
                    "{}: tensor {name} appears in more than one file",
                    path.display()
                );
            }
        }
        for name in names {
            if is_ignored_tensor(name, config) {
                continue;
            }
            let view = st
                .tensor(name)
                .map_err(|e| anyhow!("{}: tensor {name}: {e}", path.display()))?;
            let kind = kind_of(view.dtype())
                .ok_or_else(|| anyhow!("{}: tensor {name}: unsupported dtype", path.display()))?;
            let shape: Vec<i64> = view.shape().iter().map(|&s| s as i64).collect();
            let tensor = Tensor::f_from_data_size(view.data(), &shape, kind)
                .and_then(|t| t.f_to_dtype(dtype, false, false))
                .and_then(|t| t.f_to_device(device))
                .with_context(|| format!("{}: cannot convert tensor {name}", path.display()))?;
            tensors.insert(name.to_string(), tensor);
        }
    }
    let mut missing: Vec<&str> = expected
        .keys()
        .filter(|name| !tensors.contains_key(*name))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        missing.sort();
        let shown: Vec<&str> = missing.iter().take(5).copied().collect();
        bail!(
            "{}: missing tensor{} {}{} (read {})",
            dir.display(),
            if missing.len() > 1 { "s" } else { "" },
            shown.join(", "),
            if missing.len() > 5 {
                format!(" and {} more", missing.len() - 5)
            } else {
                String::new()
            },
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(tensors)
}

/// Memory-maps a weights file: a shard of a large model (about 5 GB for Llama-3.1-8B) is paged in
/// while its tensors are copied into libtorch, instead of being read whole into a buffer first,
/// which would double the peak memory of loading.
pub(crate) fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    // SAFETY: the map is read-only and lives only while this shard is converted; a checkpoint
    // being rewritten underneath a running load is outside what this loader supports.
    unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))
}

/// A tensor's bytes, ready for the safetensors writer.
struct OwnedView {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &OwnedView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn to_owned_view(name: &str, tensor: &Tensor) -> Result<OwnedView> {
    let dtype = dtype_of(tensor.kind()).with_context(|| format!("tensor {name}"))?;
    let cpu = tensor
        .f_to_device(Device::Cpu)
        .and_then(|t| t.f_contiguous())
        .with_context(|| format!("cannot copy tensor {name} to the CPU"))?;
    let numel = cpu.numel();
    let mut data = vec![0u8; numel * cpu.kind().elt_size_in_bytes()];
    cpu.f_copy_data_u8(&mut data, numel)
        .with_context(|| format!("cannot read tensor {name}"))?;
    Ok(OwnedView {
        dtype,
        shape: cpu.size().iter().map(|&s| s as usize).collect(),
        data,
    })
}

fn validate_for_save(config: &ModelConfig, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let expected: BTreeMap<String, Vec<i64>> = config.parameter_shapes().into_iter().collect();
    for (name, tensor) in tensors {
        match expected.get(name) {
            None => bail!("cannot save: unexpected tensor {name} for this config"),
            Some(shape) if *shape != tensor.size() => {
                bail!(
                    "cannot save: tensor {name} has shape {:?}, config expects {shape:?}",
                    tensor.size()
                )
            }
            _ => {}
        }
    }
    if let Some(name) = expected.keys().find(|n| !tensors.contains_key(*n)) {
        bail!("cannot save: missing tensor {name}");
    }
    Ok(())
}

/// Writes `config.json` and the weights in HF layout: one `model.safetensors`, or, when the
/// weights exceed `max_shard_bytes`, `model-0000i-of-0000n.safetensors` shards plus
/// `model.safetensors.index.json`. Files are written to a temporary directory beside `dir` and
/// then renamed into place; older weight files in `dir` are removed.
pub fn save_checkpoint(
    dir: &Path,
    config: &ModelConfig,
    tensors: &BTreeMap<String, Tensor>,
    max_shard_bytes: u64,
) -> Result<()> {
    validate_for_save(config, tensors)?;
    // Shards follow parameter order (layers stay together), as transformers does.
    let order: Vec<String> = config
        .parameter_shapes()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut shards: Vec<Vec<&str>> = vec![vec![]];
    let mut shard_bytes = 0u64;
    let mut total_bytes = 0u64;
    for name in &order {
        let t = &tensors[name];
        let bytes = (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        if shard_bytes > 0 && shard_bytes + bytes > max_shard_bytes {
            shards.push(vec![]);
            shard_bytes = 0;
        }
        shards.last_mut().expect("at least one shard").push(name);
        shard_bytes += bytes;
        total_bytes += bytes;
    }

    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let dir_name = dir
        .file_name()
        .ok_or_else(|| anyhow!("invalid output directory {}", dir.display()))?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        dir_name.to_string_lossy(),
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot clear {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;

    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let mut written = vec!["config.json".to_string()];
    let mut config_json = config.to_hf_json();
    // The dtype the weights are stored in (transformers reads it for `torch_dtype="auto"`).
    if let (Some(map), Some(t)) = (
        config_json.as_object_mut(),
        tensors.get("model.embed_tokens.weight"),
    ) {
        let name = match t.kind() {
            Kind::BFloat16 => "bfloat16",
            Kind::Half => "float16",
            Kind::Double => "float64",
            _ => "float32",
        };
        // transformers before 4.56 reads only `torch_dtype`, later ones prefer `dtype`: write
        // the first always and the second when the source had it, always with the same value.
        map.insert("torch_dtype".to_string(), json!(name));
        if map.contains_key("dtype") {
            map.insert("dtype".to_string(), json!(name));
        }
    }
    let config_text = serde_json::to_string_pretty(&config_json)?;
    std::fs::write(tmp.join("config.json"), config_text + "\n")
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    // The safetensors writer goes through a private (0600) temporary file; weight files get the
    // mode an ordinary new file gets (0666 modulo the umask), which config.json just got.
    let file_permissions = std::fs::metadata(tmp.join("config.json"))
        .with_context(|| format!("cannot stat {}", tmp.join("config.json").display()))?
        .permissions();
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, names) in shards.iter().enumerate() {
        let file = if n == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
        let views: Vec<(String, OwnedView)> = names
            .iter()
            .map(|name| Ok((name.to_string(), to_owned_view(name, &tensors[*name])?)))
            .collect::<Result<_>>()?;
        let path = tmp.join(&file);
        safetensors::tensor::serialize_to_file(
            views.iter().map(|(k, v)| (k.as_str(), v)),
            Some(metadata.clone()),
            &path,
        )
        .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
        std::fs::set_permissions(&path, file_permissions.clone())
            .with_context(|| format!("cannot set the permissions of {}", path.display()))?;
        for name in names {
            weight_map.insert(name.to_string(), json!(file));
        }
        written.push(file);
    }
    if n > 1 {
        let index = json!({ "metadata": { "total_size": total_bytes }, "weight_map": weight_map });
        std::fs::write(
            tmp.join(INDEX_FILE),
            serde_json::to_string_pretty(&index)? + "\n",
        )
        .with_context(|| format!("cannot write {}", tmp.join(INDEX_FILE).display()))?;
        written.push(INDEX_FILE.to_string());
    }

    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Remove weight files of an earlier save so the directory holds exactly one checkpoint.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let stale = name == SINGLE_FILE
                || name == INDEX_FILE
                || (name.starts_with("model-") && name.ends_with(".safetensors"));
            if stale && !written.contains(&name) {
                std::fs::remove_file(entry.path())
                    .with_context(|| format!("cannot remove stale {}", entry.path().display()))?;
            }
        }
    }
    for file in &written {
        std::fs::rename(tmp.join(file), dir.join(file))
            .with_context(|| format!("cannot move {} into {}", file, dir.display()))?;
    }
    std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    Ok(())
}

/// "f32" | "bf16" | "f16" (and the long spellings).
pub fn parse_dtype(s: &str) -> Result<Kind> {
    Ok(match s.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" | "float" => Kind::Float,
        "bf16" | "bfloat16" => Kind::BFloat16,
        "f16" | "float16" | "half" => Kind::Half,
        other => bail!("unsupported dtype {other:?} (use f32, bf16 or f16)"),
    })
}

/// Copies a file's bytes into a new file with an ordinary new file's mode (0666 modulo the
/// umask). `std::fs::copy` would copy the mode too, so a read-only source (a read-only model
/// folder or fixture) would give a read-only copy that the next run cannot replace.
pub fn copy_file_contents(from: &Path, to: &Path) -> Result<()> {
    let mut src =
        std::fs::File::open(from).with_context(|| format!("cannot read {}", from.display()))?;
    if to.exists() {
        std::fs::remove_file(to).with_context(|| format!("cannot replace {}", to.display()))?;
    }
    let mut dst =
        std::fs::File::create(to).with_context(|| format!("cannot create {}", to.display()))?;
    std::io::copy(&mut src, &mut dst)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// Copies the [`TOKENIZER_FILES`] that `from` has into `to` (with [`copy_file_contents`], so a
/// read-only source gives ordinary files): a pruned model and every saved decoder keep their
/// source's tokenizer, chat template and generation settings.
pub fn copy_tokenizer_files(from: &Path, to: &Path) -> Result<()> {
    for name in TOKENIZER_FILES {
        let src = from.join(name);
        if src.is_file() {
            copy_file_contents(&src, &to.join(name))?;
        }
    }
    Ok(())
}

/// The canonical name of a compute dtype ("f32", "bf16", "f16"), as `parse_dtype` reads it:
/// what commands echo, whatever spelling the user typed.
pub fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "f32",
        Kind::BFloat16 => "bf16",
        Kind::Half => "f16",
        Kind::Double => "f64",
        _ => "other",
    }
}

/// "cpu" | "cuda" | "cuda:N"; CUDA devices must exist.
pub fn parse_device(s: &str) -> Result<Device> {
    let s = s.trim().to_ascii_lowercase();
    let device = match s.as_str() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:") {
            Some(n) => Device::Cuda(
                n.parse()
                    .map_err(|_| anyhow!("invalid device {other:?} (use cpu, cuda or cuda:N)"))?,
            ),
            None => bail!("invalid device {other:?} (use cpu, cuda or cuda:N)"),
        },
    };
    let available = tch::Cuda::device_count() as usize;
    if let Device::Cuda(n) = device {
        if n >= available {
            bail!("device {s:?} requested but {available} CUDA device(s) are available");
        }
    }
    Ok(device)
}

/// A command's `--device` and `--dtype`, each optional: CUDA when available, else the CPU; bf16
/// on CUDA, f32 on the CPU.
pub fn device_and_dtype(device: Option<&str>, dtype: Option<&str>) -> Result<(Device, Kind)> {
    let device = match device {
        Some(d) => parse_device(d)?,
        None => Device::cuda_if_available(),
    };
    let dtype = match dtype {
        Some(d) => parse_dtype(d)?,
        None if device.is_cuda() => Kind::BFloat16,
        None => Kind::Float,
    };
    Ok((device, dtype))
}
