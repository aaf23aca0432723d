//! The key/value cache of one batched generation: per layer K and V after RoPE, and the
//! attention mask over every cached slot.
//!
//! Slots are shared by the whole batch: slot `s` of row `b` holds a real token when
//! `attention_mask[b, s] == 1` and padding otherwise, so left- and right-padded batches of
//! different prompt lengths live in one cache. The cache is a plain value: other code may read
//! it (`layers()`, `attention_mask()`) and hand it to another model with the same number of
//! layers, KV heads and head_dim (the OverFill decoder reads the full model's cache).
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// One layer's cached keys and values.
#[derive(Debug)]
struct LayerKv {
    /// [B, KV, capacity, hd]; slots `0..len` are filled.
    k: Tensor,
    /// [B, KV, capacity, hd]
    v: Tensor,
}

#[derive(Debug)]
pub struct KvCache {
    num_layers: usize,
    /// `None` until the layer is first written (prefill).
    layers: Vec<Option<LayerKv>>,
    /// Filled slots (the same for every layer once a forward pass has finished).
    len: usize,
    /// [B, len] i64, 1 = real token. Updated by `set_attention_mask` before the layers append.
    attention_mask: Option<Tensor>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            num_layers,
            layers: (0..num_layers).map(|_| None).collect(),
            len: 0,
            attention_mask: None,
        }
    }

    /// A cache holding given K/V (e.g. another model's prefill, or a hand-built one):
    /// `layers[i] = (k, v)` each [B, KV, T, hd]; `attention_mask` [B, T].
    pub fn from_parts(layers: Vec<(Tensor, Tensor)>, attention_mask: Tensor) -> Result<Self> {
        let mask_size = attention_mask.size();
        if mask_size.len() != 2 {
            bail!("KV cache attention mask must be [batch, slots], got {mask_size:?}");
        }
        let (batch, slots) = (mask_size[0], mask_size[1]);
        for (i, (k, v)) in layers.iter().enumerate() {
            let (ks, vs) = (k.size(), v.size());
            if ks.len() != 4 || ks != vs || ks[0] != batch || ks[2] != slots {
                bail!("KV cache layer {i}: K {ks:?} and V {vs:?} must both be [{batch}, kv_heads, {slots}, head_dim]");
            }
        }
        Ok(KvCache {
            num_layers: layers.len(),
            layers: layers
                .into_iter()
                .map(|(k, v)| Some(LayerKv { k, v }))
                .collect(),
            len: slots as usize,
            attention_mask: Some(attention_mask.to_kind(Kind::Int64)),
        })
    }

    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// Number of cached slots (padding included).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Batch size, once something is cached.
    pub fn batch_size(&self) -> Option<i64> {
        self.attention_mask.as_ref().map(|m| m.size()[0])
    }

    /// [B, len] i64, 1 = real token; `None` before the first forward pass.
    pub fn attention_mask(&self) -> Option<&Tensor> {
        self.attention_mask.as_ref()
    }

    /// Real tokens cached per row.
    pub fn row_lengths(&self) -> Vec<i64> {
        match &self.attention_mask {
            Some(m) => {
                Vec::<i64>::try_from(m.sum_dim_intlist(1, false, Kind::Int64)).unwrap_or_default()
            }
            None => vec![],
        }
    }

    /// Per layer (K, V), each [B, KV, len, hd] (views into the cache's storage).
    pub fn layers(&self) -> Vec<(Tensor, Tensor)> {
        self.layers
            .iter()
            .filter_map(|l| l.as_ref())
            .map(|l| {
                (
                    l.k.narrow(2, 0, self.len as i64),
                    l.v.narrow(2, 0, self.len as i64),
                )
            })
            .collect()
    }

    /// Cached (K, V) of one layer, [B, KV, len, hd]; `None` if not yet written.
    pub fn layer(&self, layer: usize) -> Option<(Tensor, Tensor)> {
        let l = self.layers.get(layer)?.as_ref()?;
        Some((
            l.k.narrow(2, 0, self.len as i64),
            l.v.narrow(2, 0, self.len as i64),
        ))
    }

    /// Forgets every slot from `len` on; the next forward pass writes its K/V there. Rewinding
    /// and running another model over the same tokens is how their entries are overwritten
    /// (`--refresh-every`: the full model replaces the K/V the decoder wrote). Storage is kept.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len > self.len {
            bail!(
                "cannot truncate a KV cache of {} slots to {len} slots",
                self.len
            );
        }
        self.len = len;
        if let Some(mask) = &self.attention_mask {
            self.attention_mask = Some(mask.narrow(1, 0, len as i64));
        }
        Ok(())
    }

    /// Called by the model before a forward step with the mask over all slots, old and new.
    pub(crate) fn set_attention_mask(&mut self, mask: &Tensor) {
        self.attention_mask = Some(mask.shallow_clone());
    }

    /// Called by the model after all layers appended `steps` slots.
    pub(crate) fn advance(&mut self, steps: usize) {
        self.len += steps;
    }

    /// Appends this step's K/V [B, KV, T, hd] to `layer` (slots `len..len+T`) and returns the
    /// keys and values over all slots, [B, KV, len+T, hd]. Storage grows by doubling, so a
    /// decode step copies only the new slot.
    pub(crate) fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let steps = k.size()[2];
        let len = self.len as i64;
        let needed = len + steps;
        let entry = &mut self.layers[layer];
        let grow = match entry {
            None => true,
            Some(l) => l.k.size()[2] < needed,
        };
        if grow {
            let mut shape = k.size();
            // Prefill allocates a little room for decoding; later growth doubles.
            let capacity = match entry {
                None => needed + 64.max(needed / 4),
                Some(l) => needed.max(2 * l.k.size()[2]),
            };
            shape[2] = capacity;
            let new_k = Tensor::zeros(shape.as_slice(), (k.kind(), k.device()));
            let new_v = Tensor::zeros(shape.as_slice(), (v.kind(), v.device()));
            if let Some(old) = entry.as_ref() {
                new_k.narrow(2, 0, len).copy_(&old.k.narrow(2, 0, len));
                new_v.narrow(2, 0, len).copy_(&old.v.narrow(2, 0, len));
            }
            *entry = Some(LayerKv { k: new_k, v: new_v });
        }
        let l = entry.as_ref().expect("layer storage was just allocated");
        l.k.narrow(2, len, steps).copy_(k);
        l.v.narrow(2, len, steps).copy_(v);
        (l.k.narrow(2, 0, needed), l.v.narrow(2, 0, needed))
    }
}
