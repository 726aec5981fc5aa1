//! Key material that is wiped when dropped. `SecurityAssociation` keeps its key schedules
//! (AES round keys, HMAC inner/outer state, IV key) inline, so overwriting the struct's own
//! bytes after its destructor ran wipes them; the replay bitmap on the heap holds no keys.
//! (Key bytes that passed through Python `bytes` objects cannot be wiped from here.)

use std::alloc::{dealloc, Layout};
use std::mem::{size_of, ManuallyDrop};
use std::ops::{Deref, DerefMut};
use std::ptr;
use std::sync::atomic::{compiler_fence, Ordering};

pub struct Zeroizing<T>(ManuallyDrop<Box<T>>);

impl<T> Zeroizing<T> {
    pub fn new(v: T) -> Zeroizing<T> {
        Zeroizing(ManuallyDrop::new(Box::new(v)))
    }
}

impl<T> Deref for Zeroizing<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> DerefMut for Zeroizing<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T> Drop for Zeroizing<T> {
    fn drop(&mut self) {
        // SAFETY: the box is taken exactly once (here). Its value is dropped in place, then the
        // allocation (still ours, made by Box with Layout::new::<T>()) is overwritten byte by
        // byte with volatile writes and freed with that same layout.
        unsafe {
            let b = ManuallyDrop::take(&mut self.0);
            let p = Box::into_raw(b);
            ptr::drop_in_place(p);
            let bytes = p.cast::<u8>();
            for i in 0..size_of::<T>() {
                ptr::write_volatile(bytes.add(i), 0);
            }
            compiler_fence(Ordering::SeqCst);
            if size_of::<T>() != 0 {
                dealloc(bytes, Layout::new::<T>());
            }
        }
    }
}
