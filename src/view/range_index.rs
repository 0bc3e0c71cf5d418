//! The lookup index of a [`FlatView`](crate::FlatView): which range starts
//! last at or below an address.
//!
//! Invariant: built once from the sorted starts of a view's ranges and never
//! changed; its answer is the same as a binary search over those starts.

/// The lookup accelerator of a [`FlatView`](crate::FlatView): "which range starts last at or
/// below `addr`" in (usually) two loads from one small table.
///
/// The span from the first range's start to the last range's start is cut
/// into `nb` buckets of `2^shift` bytes (`nb` about four per range, at most
/// [`RangeIndex::MAX_BUCKETS`]). `table[b]` is the index of the last range
/// starting at or below the first address of bucket `b`; `table[nb]` is the
/// last range. The answer for an address in bucket `b` lies in
/// `table[b]..=table[b + 1]`, which is almost always one or two ranges; when
/// a bucket holds more (many small ranges packed in a large sparse span), a
/// binary search over that slice of the packed `starts` finishes the job.
pub(crate) struct RangeIndex {
    /// The `start` of every range, in order.
    starts: Box<[u64]>,
    /// `starts[0]` (0 for an empty view).
    base: u64,
    /// Log2 of the bucket size.
    shift: u32,
    /// `nb + 1` entries, see the type docs (empty for an empty view).
    table: Box<[u32]>,
}

impl RangeIndex {
    /// Bucket budget: 64 KiB of table at most.
    const MAX_BUCKETS: u64 = 1 << 14;

    /// Builds the index over `starts` (sorted, distinct).
    pub(crate) fn new(starts: Box<[u64]>) -> RangeIndex {
        let n = starts.len();
        let (Some(&base), Some(&top)) = (starts.first(), starts.last()) else {
            return RangeIndex {
                starts,
                base: 0,
                shift: 0,
                table: Box::new([]),
            };
        };
        // Ranges are indexed by u32 (a flat view has far fewer ranges).
        let n32 = u32::try_from(n).unwrap_or(u32::MAX);
        let budget = (u64::from(n32) * 4)
            .next_power_of_two()
            .clamp(16, Self::MAX_BUCKETS);
        let span = top - base;
        let mut shift = 0u32;
        while shift < 63 && (span >> shift) >= budget {
            shift += 1;
        }
        let nb = (span >> shift) + 1;
        let mut table = Vec::with_capacity(nb as usize + 1);
        let mut j = 0usize;
        for b in 0..nb {
            let at = base + (b << shift);
            while j + 1 < n && starts[j + 1] <= at {
                j += 1;
            }
            table.push(j as u32);
        }
        table.push((n - 1) as u32);
        RangeIndex {
            starts,
            base,
            shift,
            table: table.into_boxed_slice(),
        }
    }

    /// Index of the last range starting at or below `addr`.
    #[inline]
    pub(crate) fn last_start_at_or_below(&self, addr: u64) -> Option<usize> {
        let off = addr.checked_sub(self.base)?;
        let last_bucket = self.table.len().checked_sub(2)?;
        let b = usize::try_from(off >> self.shift)
            .unwrap_or(usize::MAX)
            .min(last_bucket);
        let lo = *self.table.get(b)? as usize;
        let hi = *self.table.get(b + 1)? as usize;
        if lo == hi {
            return Some(lo);
        }
        let more = self.starts.get(lo + 1..=hi)?;
        Some(lo + more.partition_point(|&s| s <= addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(miri, ignore = "hundreds of thousands of cases: minutes under Miri")]
    fn range_index_matches_a_binary_search() {
        let layouts: Vec<Vec<u64>> = vec![
            vec![],
            vec![0],
            vec![5],
            vec![
                0,
                0xa0000,
                0xc0000,
                0x10_0000,
                0xfec0_0000,
                0xfee0_0000,
                0x1_0000_0000,
            ],
            (0..1024u64).map(|i| (1 << 20) + i * (128 << 10)).collect(),
            vec![0, 1, 2, 3, u64::MAX - 1, u64::MAX],
            (0..100u64).map(|i| i * i * i * 7).collect(),
        ];
        let mut x = 0x1234_5678_9abc_def1u64;
        for starts in layouts {
            let idx = RangeIndex::new(starts.clone().into_boxed_slice());
            let expect = |a: u64| starts.partition_point(|&s| s <= a).checked_sub(1);
            let mut probes: Vec<u64> = vec![0, 1, u64::MAX, u64::MAX - 1];
            for &s in &starts {
                probes.extend([s, s.wrapping_sub(1), s.wrapping_add(1)]);
            }
            for _ in 0..2000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                probes.push(x);
                if let Some(&top) = starts.last() {
                    probes.push(x % top.max(1).saturating_mul(2).max(1));
                }
            }
            for a in probes {
                assert_eq!(
                    idx.last_start_at_or_below(a),
                    expect(a),
                    "{a:#x} in {starts:x?}"
                );
            }
        }
    }
}
