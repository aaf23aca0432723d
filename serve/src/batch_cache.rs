//! Row-wise surgery on a KV cache for continuous batching: the rows of newly prefilled
//! requests join the running batch's cache, and the rows of finished requests leave it.
//!
//! Slots are shared by the whole batch and each row says which of them are real through the
//! attention mask, so two caches of different lengths are aligned by left-padding the shorter
//! one with masked (zero) slots. Rope positions are kept per row by the engine, so a row's
//! padding never shifts its positions. Built on `KvCache`'s public parts only.
//!
//! Shapes: B rows, KV heads, S slots, hd head_dim.
use anyhow::{bail, Result};
use overfill_model::kv_cache::KvCache;
use tch::{Kind, Tensor};

/// Per layer (K, V) [B, KV, S, hd] and the mask [B, S] of a cache that has been written.
fn parts(cache: &KvCache) -> Result<(Vec<(Tensor, Tensor)>, Tensor)> {
    let Some(mask) = cache.attention_mask() else {
        bail!("internal: a KV cache that was never written");
    };
    let layers = cache.layers();
    if layers.len() != cache.num_layers() {
        bail!("internal: a KV cache with unwritten layers");
    }
    Ok((layers, mask.shallow_clone()))
}

/// `t` [B, ..., S, ...] with `pad` zero slots put in front along `dim`.
fn left_pad_slots(t: &Tensor, dim: i64, pad: i64) -> Tensor {
    if pad == 0 {
        return t.shallow_clone();
    }
    let mut shape = t.size();
    shape[dim as usize] = pad;
    let zeros = Tensor::zeros(shape.as_slice(), (t.kind(), t.device()));
    Tensor::cat(&[&zeros, t], dim)
}

/// The rows of `running` followed by the rows of `joining` (each cache's rows in order).
pub fn concat_rows(running: &KvCache, joining: &KvCache) -> Result<KvCache> {
    let (a_layers, a_mask) = parts(running)?;
    let (b_layers, b_mask) = parts(joining)?;
    if a_layers.len() != b_layers.len() {
        bail!(
            "internal: caches of {} and {} layers cannot be merged",
            a_layers.len(),
            b_layers.len()
        );
    }
    let (a_slots, b_slots) = (a_mask.size()[1], b_mask.size()[1]);
    let slots = a_slots.max(b_slots);
    let (a_pad, b_pad) = (slots - a_slots, slots - b_slots);
    let layers = a_layers
        .iter()
        .zip(&b_layers)
        .map(|((ak, av), (bk, bv))| {
            (
                Tensor::cat(
                    &[left_pad_slots(ak, 2, a_pad), left_pad_slots(bk, 2, b_pad)],
                    0,
                ),
                Tensor::cat(
                    &[left_pad_slots(av, 2, a_pad), left_pad_slots(bv, 2, b_pad)],
                    0,
                ),
            )
        })
        .collect();
    let mask = Tensor::cat(
        &[
            left_pad_slots(&a_mask.to_kind(Kind::Int64), 1, a_pad),
            left_pad_slots(&b_mask.to_kind(Kind::Int64), 1, b_pad),
        ],
        0,
    );
    KvCache::from_parts(layers, mask)
}

/// The cache of rows `keep` (indices into `cache`'s rows, in the order wanted), without the
/// leading slots that none of them uses. `None` when no row is kept.
pub fn select_rows(cache: &KvCache, keep: &[i64]) -> Result<Option<KvCache>> {
    if keep.is_empty() {
        return Ok(None);
    }
    let (layers, mask) = parts(cache)?;
    let device = mask.device();
    let index = Tensor::from_slice(keep).to_device(device);
    let mask = mask.index_select(0, &index);
    // Slots every kept row masks out (the left padding of the rows that left) are dropped.
    let used = Vec::<i64>::try_from(mask.sum_dim_intlist(0, false, Kind::Int64))?;
    let first = used.iter().position(|&n| n > 0).unwrap_or(used.len()) as i64;
    let slots = used.len() as i64 - first;
    let layers = layers
        .iter()
        .map(|(k, v)| {
            (
                k.index_select(0, &index).narrow(2, first, slots),
                v.index_select(0, &index).narrow(2, first, slots),
            )
        })
        .collect();
    Ok(Some(KvCache::from_parts(
        layers,
        mask.narrow(1, first, slots),
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache of one layer whose K slot values are `row * 100 + slot` (V the negation).
    fn cache(rows: i64, slots: i64, mask: &[i64]) -> KvCache {
        let values: Vec<f32> = (0..rows)
            .flat_map(|r| (0..slots).map(move |s| (r * 100 + s) as f32))
            .collect();
        let k = Tensor::from_slice(&values).view([rows, 1, slots, 1]);
        let v = -&k;
        let mask = Tensor::from_slice(mask).view([rows, slots]);
        KvCache::from_parts(vec![(k, v)], mask).unwrap()
    }

    fn k_rows(cache: &KvCache) -> Vec<Vec<f32>> {
        let (k, _) = &cache.layers()[0];
        (0..k.size()[0])
            .map(|r| Vec::<f32>::try_from(k.get(r).flatten(0, -1)).unwrap())
            .collect()
    }

    fn mask_rows(cache: &KvCache) -> Vec<Vec<i64>> {
        let m = cache.attention_mask().unwrap();
        (0..m.size()[0])
            .map(|r| Vec::<i64>::try_from(m.get(r)).unwrap())
            .collect()
    }

    #[test]
    fn joining_rows_are_left_padded_to_the_longer_cache() {
        let running = cache(1, 3, &[1, 1, 1]);
        let joining = cache(2, 2, &[0, 1, 1, 1]);
        let merged = concat_rows(&running, &joining).unwrap();
        assert_eq!(merged.len(), 3);
        assert_eq!(
            k_rows(&merged),
            vec![vec![0., 1., 2.], vec![0., 0., 1.], vec![0., 100., 101.]]
        );
        assert_eq!(
            mask_rows(&merged),
            vec![vec![1, 1, 1], vec![0, 0, 1], vec![0, 1, 1]]
        );
        // And the other way round: the running rows get the padding.
        let merged = concat_rows(&joining, &running).unwrap();
        assert_eq!(
            mask_rows(&merged),
            vec![vec![0, 0, 1], vec![0, 1, 1], vec![1, 1, 1]]
        );
        let (_, v) = &merged.layers()[0];
        assert_eq!(v.get(2).flatten(0, -1).double_value(&[2]), -2.0);
    }

    #[test]
    fn leaving_rows_take_their_padding_with_them() {
        let c = cache(3, 4, &[1, 1, 1, 1, 0, 0, 1, 1, 0, 1, 1, 1]);
        let kept = select_rows(&c, &[2, 1]).unwrap().unwrap();
        assert_eq!(kept.len(), 3);
        assert_eq!(mask_rows(&kept), vec![vec![1, 1, 1], vec![0, 1, 1]]);
        assert_eq!(
            k_rows(&kept),
            vec![vec![201., 202., 203.], vec![101., 102., 103.]]
        );
        assert!(select_rows(&c, &[]).unwrap().is_none());
    }
}
