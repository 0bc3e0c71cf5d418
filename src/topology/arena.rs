//! A generational arena: the storage behind the topology's regions, owners and
//! address spaces.
//!
//! Ids are `(index, generation)`. Removing an entry bumps the slot's
//! generation, so an id kept past its entry's removal is *stale* and every
//! lookup with it fails cleanly instead of reaching whatever reused the slot.
//!
//! **Invariant:** a slot never holds two entries with the same generation,
//! so a stale id can never match again. Generations only grow; a slot
//! whose generation cannot grow any more (`u32::MAX`, after 2^32 - 1 reuses)
//! is *retired* when its entry is removed: it stays empty and is never
//! handed out again. Retiring costs one empty slot per 2^32 removals at the
//! same index, so the arena cannot grow noticeably from it.

/// A slot: the current generation and the entry, if occupied.
#[derive(Debug)]
struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

/// Generational arena.
#[derive(Debug)]
pub(crate) struct Arena<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Arena<T> {
    fn default() -> Self {
        Arena {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Arena<T> {
    /// The `(index, generation)` the next `insert` will use.
    pub(crate) fn next_id(&self) -> (u32, u32) {
        match self.free.last() {
            Some(&i) => (i, self.slots[i as usize].generation),
            None => (self.slots.len() as u32, 0),
        }
    }

    pub(crate) fn insert(&mut self, value: T) -> (u32, u32) {
        self.len += 1;
        match self.free.pop() {
            Some(i) => {
                let slot = &mut self.slots[i as usize];
                slot.value = Some(value);
                (i, slot.generation)
            }
            None => {
                let i = self.slots.len() as u32;
                self.slots.push(Slot {
                    generation: 0,
                    value: Some(value),
                });
                (i, 0)
            }
        }
    }

    pub(crate) fn get(&self, index: u32, generation: u32) -> Option<&T> {
        let slot = self.slots.get(index as usize)?;
        (slot.generation == generation)
            .then_some(slot.value.as_ref())
            .flatten()
    }

    pub(crate) fn get_mut(&mut self, index: u32, generation: u32) -> Option<&mut T> {
        let slot = self.slots.get_mut(index as usize)?;
        if slot.generation != generation {
            return None;
        }
        slot.value.as_mut()
    }

    pub(crate) fn remove(&mut self, index: u32, generation: u32) -> Option<T> {
        let slot = self.slots.get_mut(index as usize)?;
        if slot.generation != generation {
            return None;
        }
        let value = slot.value.take()?;
        self.len -= 1;
        // With its generations exhausted the slot is retired (not put on
        // the free list, never reused), so that no generation ever names
        // two entries of it.
        if let Some(next) = slot.generation.checked_add(1) {
            slot.generation = next;
            self.free.push(index);
        }
        Some(value)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = ((u32, u32), &T)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.value.as_ref().map(|v| ((i as u32, s.generation), v)))
    }
}

#[cfg(test)]
impl<T> Arena<T> {
    /// Sets a slot's generation, as if it had been reused that often.
    fn set_generation_for_test(&mut self, index: u32, generation: u32) {
        self.slots[index as usize].generation = generation;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_slot_with_exhausted_generations_is_retired_not_wrapped() {
        let mut a = Arena::default();
        let (i, g0) = a.insert("first");
        assert_eq!(g0, 0);
        assert_eq!(a.remove(i, g0), Some("first"));
        // The slot has been reused 2^32 - 1 times since "first".
        let (i1, _) = a.insert("last of the slot");
        assert_eq!(i1, i);
        a.set_generation_for_test(i, u32::MAX);
        assert_eq!(a.remove(i, u32::MAX), Some("last of the slot"));
        assert_eq!(a.len(), 0);
        let next = a.next_id();
        let (i2, g2) = a.insert("second");
        assert_eq!((i2, g2), next);
        assert_eq!(a.get(i2, g2), Some(&"second"));
        // Neither the first id nor the last one of the slot reaches it.
        assert_eq!(a.get(i, g0), None, "a stale id matched a reused slot");
        assert_eq!(a.get(i, u32::MAX), None);
        assert_eq!(a.remove(i, g0), None);
        assert_ne!(i2, i, "the exhausted slot is never handed out again");
        assert_eq!(a.iter().count(), 1);
    }

    #[test]
    fn arena_stale_ids_never_reach_a_reused_slot() {
        let mut a = Arena::default();
        let (i, g) = a.insert("first");
        assert_eq!(a.remove(i, g), Some("first"));
        let (i2, g2) = a.insert("second");
        assert_eq!(i2, i);
        assert_ne!(g2, g);
        assert_eq!(a.get(i, g), None);
        assert_eq!(a.get(i2, g2), Some(&"second"));
        assert_eq!(a.len(), 1);
    }
}
