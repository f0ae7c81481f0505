//! Rust guests for wasmshare: safe views of the regions a host lends into a wasm guest.
//!
//! The host maps shared memory *into* this guest's linear memory and hands it a
//! (pointer, length) window; this crate turns each window into the slice it is:
//! `&[u8]` for a read-only loan, `&mut [u32]` for the mask row, `&mut [f32]` for the
//! bias row, `&[u32]` for the sampled tokens, and the token table as an iterator of
//! byte strings. No byte is copied: writing `mask[3] = 0` writes the host's batch
//! tensor. Writing a read-only window traps, as does touching one after its loan
//! ended, so a bug in a guest ends that guest and nothing else.
//!
//! A controller is a type implementing [`Controller`], exported with
//! [`controller!`]:
//!
//! ```ignore
//! #![no_std]
//! use wasmshare_guest::{controller, Controller, Create, Error, Output, Step};
//!
//! struct NoEos { sampled: u32 }
//!
//! impl Controller for NoEos {
//!     fn create(_: &mut Create<'_>) -> Result<Self, Error> { Ok(NoEos { sampled: 0 }) }
//!     fn step(&mut self, step: &mut Step<'_>) -> Result<(), Error> {
//!         self.sampled += step.sampled().len() as u32;
//!         let eos = step.token_table()?.eos().ok_or(Error::FAILED)?;
//!         wasmshare_guest::mask::set(step.mask(), eos, self.sampled >= 10);
//!         step.answer(Output::Bitmask);
//!         Ok(())
//!     }
//! }
//! controller!(NoEos);
//! ```
//!
//! The crate is `no_std` and has no dependencies (guests are built offline, for
//! `wasm32-unknown-unknown`). It defines the panic handler: a panic traps (wasm
//! `unreachable`) after logging its source location through `ws_log`, so the host
//! ends that one guest with an error. The ABI it implements is docs/abi.md and
//! docs/controller-abi.md; the layouts are checked at compile time below.

#![no_std]
#![warn(missing_docs)]

use core::marker::PhantomData;
use core::mem::size_of;

/// Version of the core ABI this crate implements (`ws_abi_version`).
pub const ABI_VERSION: i32 = 1;
/// Version of the controller ABI this crate implements (`ws_ctrl_abi_version`).
pub const CONTROLLER_ABI_VERSION: i32 = 1;
/// Size of a wasm page, and the alignment of every loan window.
pub const PAGE_SIZE: usize = 65536;
/// Capacity of a step result's fast-forward list.
pub const MAX_FF_TOKENS: usize = 1024;
/// Token flag: a special token (end of sequence, ...), whose bytes are not text.
pub const TOKEN_SPECIAL: u8 = 1;
/// `"WSTT"` little-endian: the first word after `struct_size` of a token table.
pub const TOKEN_TABLE_MAGIC: u32 = 0x5454_5357;
/// An absent token id (`eos_token` / `bos_token` of a vocabulary without one).
pub const NO_TOKEN: u32 = u32::MAX;

/// The raw ABI: the structs exactly as the host lays them out, and the host imports.
///
/// Everything here is what the C header `wasmshare_controller.h` declares; the safe
/// types of the crate are built on it. Use it directly only for what they lack.
pub mod sys {
    /// Header of the token table loan (64 bytes, read-only).
    #[repr(C)]
    #[allow(missing_docs)]
    pub struct TokenTable {
        pub struct_size: u32,
        pub magic: u32,
        pub version: u32,
        pub n_tokens: u32,
        pub offsets_offset: u32,
        pub flags_offset: u32,
        pub bytes_offset: u32,
        pub bytes_len: u32,
        pub eos_token: u32,
        pub bos_token: u32,
        pub reserved: [u32; 6],
    }

    /// What the host tells a controller each call (68 bytes, host-written).
    #[repr(C)]
    #[allow(missing_docs)]
    pub struct StepInput {
        pub struct_size: u32,
        pub abi_version: u32,
        pub vocab_size: u32,
        pub mask_words: u32,
        pub token_table: *const TokenTable,
        pub mask: *mut u32,
        pub bias: *mut f32,
        pub step: u32,
        pub n_tokens: u32,
        pub tokens: *const u32,
        pub arg: *const u8,
        pub arg_len: u32,
        pub sequence_id: u32,
        pub reserved: [u32; 4],
    }

    /// What a controller answers (4128 bytes; the host resets it before each call).
    #[repr(C)]
    #[allow(missing_docs)]
    pub struct StepResult {
        pub struct_size: u32,
        pub action: i32,
        pub output: i32,
        pub backtrack: u32,
        pub n_ff: u32,
        pub n_bias: u32,
        pub reserved: [u32; 2],
        pub ff_tokens: [u32; super::MAX_FF_TOKENS],
    }

    #[cfg(target_arch = "wasm32")]
    #[link(wasm_import_module = "wasmshare")]
    #[allow(missing_docs)]
    extern "C" {
        pub fn ws_borrow(handle: i32, access: i32) -> i32;
        pub fn ws_release(handle: i32) -> i32;
        pub fn ws_region_size(handle: i32) -> i64;
        pub fn ws_log(msg: *const u8, len: i32);
        pub fn ws_constraint_open(kind: i32, spec: *const u8, len: i32) -> i32;
        pub fn ws_constraint_fill_mask(handle: i32, mask: *mut u32, words: i32) -> i32;
        pub fn ws_constraint_consume(handle: i32, token: u32) -> i32;
        pub fn ws_constraint_is_accepting(handle: i32) -> i32;
        pub fn ws_constraint_is_stopped(handle: i32) -> i32;
        pub fn ws_constraint_close(handle: i32) -> i32;
    }
}

// The layouts of docs/controller-abi.md, checked when the crate compiles.
const _: () = assert!(size_of::<sys::TokenTable>() == 64);
const _: () = assert!(size_of::<sys::StepInput>() == 68 || size_of::<usize>() != 4);
const _: () = assert!(size_of::<sys::StepResult>() == 32 + 4 * MAX_FF_TOKENS);

/// A status code the host understands (`WS_ERR_*`): what a failed call returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Error(pub i32);

impl Error {
    /// `WS_ERR_BAD_HANDLE`: no region is offered under this handle.
    pub const BAD_HANDLE: Error = Error(-1);
    /// `WS_ERR_ACCESS`: the access asked for is not allowed.
    pub const ACCESS: Error = Error(-2);
    /// `WS_ERR_NOT_BORROWED`: a release of a handle not borrowed.
    pub const NOT_BORROWED: Error = Error(-3);
    /// `WS_ERR_FAILED`: anything else; what a controller returns for a bad argument.
    pub const FAILED: Error = Error(-4);
    // The constraint codes reuse the values above; only [`Constraint`] returns them.
    /// `WS_CONSTRAINT_ERR_BAD_HANDLE`: no open constraint under this handle.
    pub const CONSTRAINT_BAD_HANDLE: Error = Error(-1);
    /// `WS_CONSTRAINT_ERR_SPEC`: the host could not compile the spec (it logs why).
    pub const CONSTRAINT_SPEC: Error = Error(-2);
    /// `WS_CONSTRAINT_ERR_REJECTED`: the constraint does not allow that token.
    pub const CONSTRAINT_REJECTED: Error = Error(-3);
    /// `WS_CONSTRAINT_ERR_BOUNDS`: the mask given is not the right size.
    pub const CONSTRAINT_BOUNDS: Error = Error(-4);
}

/// `Ok` for a status code of 0 or more, else the [`Error`].
#[inline]
fn status(code: i32) -> Result<i32, Error> {
    if code >= 0 {
        Ok(code)
    } else {
        Err(Error(code))
    }
}

/// A slice over a host window, empty when the host passed no window at all.
///
/// # Safety
/// `ptr` must point at `len` readable `T` for `'a` (or `len` be 0).
#[inline]
unsafe fn window<'a, T>(ptr: *const T, len: usize) -> &'a [T] {
    if len == 0 || ptr.is_null() {
        &[]
    } else {
        core::slice::from_raw_parts(ptr, len)
    }
}

/// The mutable twin of [`window`].
///
/// # Safety
/// `ptr` must point at `len` writable `T` for `'a`, aliased by nothing else.
#[inline]
unsafe fn window_mut<'a, T>(ptr: *mut T, len: usize) -> &'a mut [T] {
    if len == 0 || ptr.is_null() {
        &mut []
    } else {
        core::slice::from_raw_parts_mut(ptr, len)
    }
}

/// The tokenizer's vocabulary, read in place from the shared read-only loan.
///
/// Every token's bytes are checked against the table's own bounds before a slice is
/// made, so a malformed table gives `None`, never a wild read.
#[derive(Clone, Copy)]
pub struct TokenTable<'a> {
    offsets: &'a [u32],
    flags: &'a [u8],
    bytes: &'a [u8],
    eos: u32,
    bos: u32,
}

impl<'a> TokenTable<'a> {
    /// The table at `header`, after checking its magic, version and layout.
    ///
    /// # Safety
    /// `header` must be the host's token table loan, mapped for `'a`.
    unsafe fn from_header(header: *const sys::TokenTable) -> Result<Self, Error> {
        if header.is_null() {
            return Err(Error::FAILED);
        }
        let h = &*header;
        if h.magic != TOKEN_TABLE_MAGIC || h.version != 1 || (h.struct_size as usize) < size_of::<sys::TokenTable>() {
            return Err(Error::FAILED);
        }
        let base = header as *const u8;
        let n = h.n_tokens as usize;
        if h.offsets_offset % 4 != 0 || n == usize::MAX {
            return Err(Error::FAILED);
        }
        let offsets = window(base.add(h.offsets_offset as usize) as *const u32, n + 1);
        let flags = window(base.add(h.flags_offset as usize), n);
        let bytes = window(base.add(h.bytes_offset as usize), h.bytes_len as usize);
        Ok(TokenTable { offsets, flags, bytes, eos: h.eos_token, bos: h.bos_token })
    }

    /// Number of tokens V.
    #[inline]
    pub fn len(&self) -> u32 {
        self.flags.len() as u32
    }

    /// Whether the vocabulary is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.flags.is_empty()
    }

    /// The bytes token `t` decodes to (UTF-8 fragments are possible); `None` for an id
    /// out of range or offsets outside the table.
    #[inline]
    pub fn bytes(&self, t: u32) -> Option<&'a [u8]> {
        let t = t as usize;
        let start = *self.offsets.get(t)? as usize;
        let end = *self.offsets.get(t + 1)? as usize;
        self.bytes.get(start..end)
    }

    /// Whether token `t` is special (its bytes are not text); false out of range.
    #[inline]
    pub fn is_special(&self, t: u32) -> bool {
        self.flags.get(t as usize).map_or(false, |f| f & TOKEN_SPECIAL != 0)
    }

    /// The end-of-sequence token, if the vocabulary has one.
    #[inline]
    pub fn eos(&self) -> Option<u32> {
        (self.eos != NO_TOKEN).then(|| self.eos)
    }

    /// The beginning-of-sequence token, if the vocabulary has one.
    #[inline]
    pub fn bos(&self) -> Option<u32> {
        (self.bos != NO_TOKEN).then(|| self.bos)
    }

    /// Every token in id order.
    pub fn iter(&self) -> Tokens<'a> {
        Tokens { table: *self, next: 0 }
    }
}

impl<'a> IntoIterator for TokenTable<'a> {
    type Item = Token<'a>;
    type IntoIter = Tokens<'a>;
    fn into_iter(self) -> Tokens<'a> {
        self.iter()
    }
}

/// One entry of the token table.
#[derive(Clone, Copy, Debug)]
pub struct Token<'a> {
    /// The token id.
    pub id: u32,
    /// Its bytes (empty when the table's offsets for it are malformed).
    pub bytes: &'a [u8],
    /// Whether it is special (end of sequence, ...): its bytes are not text.
    pub special: bool,
}

/// Iterator over a [`TokenTable`], in id order.
pub struct Tokens<'a> {
    table: TokenTable<'a>,
    next: u32,
}

impl<'a> Iterator for Tokens<'a> {
    type Item = Token<'a>;
    #[inline]
    fn next(&mut self) -> Option<Token<'a>> {
        let id = self.next;
        if id >= self.table.len() {
            return None;
        }
        self.next += 1;
        Some(Token { id, bytes: self.table.bytes(id).unwrap_or(&[]), special: self.table.is_special(id) })
    }
}

/// Bitmask helpers for a mask row (bit `t % 32` of word `t / 32` set = token t allowed).
pub mod mask {
    /// Allow or ban token `t`; ids past the row are ignored.
    #[inline]
    pub fn set(mask: &mut [u32], t: u32, allowed: bool) {
        if let Some(word) = mask.get_mut((t / 32) as usize) {
            let bit = 1u32 << (t % 32);
            if allowed {
                *word |= bit;
            } else {
                *word &= !bit;
            }
        }
    }

    /// Allow token `t`.
    #[inline]
    pub fn allow(mask: &mut [u32], t: u32) {
        set(mask, t, true)
    }

    /// Ban token `t`.
    #[inline]
    pub fn ban(mask: &mut [u32], t: u32) {
        set(mask, t, false)
    }

    /// Whether token `t` is allowed (false past the row).
    #[inline]
    pub fn allowed(mask: &[u32], t: u32) -> bool {
        mask.get((t / 32) as usize).map_or(false, |w| w & (1u32 << (t % 32)) != 0)
    }

    /// Ban every token.
    #[inline]
    pub fn clear(mask: &mut [u32]) {
        mask.fill(0)
    }

    /// Allow every token (bits past V are ignored by the host).
    #[inline]
    pub fn fill(mask: &mut [u32]) {
        mask.fill(u32::MAX)
    }
}

/// The sparse-bias view of the bias slot: `ids[i]` gets `values[i]` added, `i < n`.
///
/// Both halves of the slot: ids are its first `V / 2` entries read as `u32`, values
/// the `V / 2` from entry `V / 2` on. Answer with [`Output::SparseBias`]`(n)`.
pub struct SparseBias<'a> {
    /// Token ids, each below V.
    pub ids: &'a mut [u32],
    /// The value added to the logit of the token of the same index.
    pub values: &'a mut [f32],
}

/// What the next token is sampled under (`out->output`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// No constraint: the slots are not read.
    None,
    /// The mask row.
    Bitmask,
    /// The bias row, added to the logits.
    Bias,
    /// The first `n` pairs of [`SparseBias`] (`n` at most `V / 2`).
    SparseBias(u32),
}

/// The slots and the read-only inputs every call sees.
struct Slots<'a> {
    input: &'a sys::StepInput,
}

impl<'a> Slots<'a> {
    fn vocab_size(&self) -> u32 {
        self.input.vocab_size
    }

    fn tokens(&self) -> &'a [u32] {
        // SAFETY: the host lends `n_tokens` tokens in the step record for this call.
        unsafe { window(self.input.tokens, self.input.n_tokens as usize) }
    }

    fn token_table(&self) -> Result<TokenTable<'a>, Error> {
        // SAFETY: the token table loan is mapped for as long as the controller lives.
        unsafe { TokenTable::from_header(self.input.token_table) }
    }

    fn mask(&mut self) -> &mut [u32] {
        // SAFETY: the mask row is this sequence's own, `mask_words` long; `&mut self`
        // keeps a second view from existing at the same time.
        unsafe { window_mut(self.input.mask, self.input.mask_words as usize) }
    }

    fn bias(&mut self) -> &mut [f32] {
        // SAFETY: as for the mask: this sequence's own row of V floats.
        unsafe { window_mut(self.input.bias, self.input.vocab_size as usize) }
    }

    fn sparse_bias(&mut self) -> SparseBias<'_> {
        let half = (self.input.vocab_size / 2) as usize;
        // SAFETY: the two halves of the bias row do not overlap; u32 and f32 share size
        // and alignment.
        unsafe {
            SparseBias {
                ids: window_mut(self.input.bias as *mut u32, half),
                values: window_mut(self.input.bias.add(half), half),
            }
        }
    }
}

/// What `create` sees: the argument, the prompt, the vocabulary and the output slots.
pub struct Create<'a> {
    slots: Slots<'a>,
}

impl<'a> Create<'a> {
    /// The controller's argument bytes (not NUL-terminated; valid during create only).
    pub fn arg(&self) -> &'a [u8] {
        // SAFETY: the host lends `arg_len` bytes in the step record during create.
        unsafe { window(self.slots.input.arg, self.slots.input.arg_len as usize) }
    }

    /// The prompt's tokens.
    pub fn prompt(&self) -> &'a [u32] {
        self.slots.tokens()
    }

    /// Vocabulary size V (the length of the bias row).
    pub fn vocab_size(&self) -> u32 {
        self.slots.vocab_size()
    }

    /// The host's id of this sequence.
    pub fn sequence_id(&self) -> u32 {
        self.slots.input.sequence_id
    }

    /// The token table (read-only, shared by every controller of the batch).
    pub fn token_table(&self) -> Result<TokenTable<'a>, Error> {
        self.slots.token_table()
    }

    /// The mask row, `ceil(V / 32)` words; all-allowed before create.
    pub fn mask(&mut self) -> &mut [u32] {
        self.slots.mask()
    }

    /// The bias row, V floats; zero before create.
    pub fn bias(&mut self) -> &mut [f32] {
        self.slots.bias()
    }

    /// The bias row as sparse (id, value) pairs.
    pub fn sparse_bias(&mut self) -> SparseBias<'_> {
        self.slots.sparse_bias()
    }
}

/// What a step sees (the tokens sampled since the last step, the slots) and answers.
pub struct Step<'a> {
    slots: Slots<'a>,
    result: &'a mut sys::StepResult,
}

impl<'a> Step<'a> {
    /// 0 at the first step, then 1, 2, ...
    pub fn index(&self) -> u32 {
        self.slots.input.step
    }

    /// The tokens sampled since the previous step (none at step 0).
    pub fn sampled(&self) -> &'a [u32] {
        self.slots.tokens()
    }

    /// Vocabulary size V.
    pub fn vocab_size(&self) -> u32 {
        self.slots.vocab_size()
    }

    /// The token table (read-only, shared by every controller of the batch).
    pub fn token_table(&self) -> Result<TokenTable<'a>, Error> {
        self.slots.token_table()
    }

    /// The mask row; it keeps its contents between steps.
    pub fn mask(&mut self) -> &mut [u32] {
        self.slots.mask()
    }

    /// The bias row; it keeps its contents between steps.
    pub fn bias(&mut self) -> &mut [f32] {
        self.slots.bias()
    }

    /// The bias row as sparse (id, value) pairs.
    pub fn sparse_bias(&mut self) -> SparseBias<'_> {
        self.slots.sparse_bias()
    }

    /// Sample the next token under `output` (the default is [`Output::None`]).
    pub fn answer(&mut self, output: Output) {
        let (kind, n) = match output {
            Output::None => (0, 0),
            Output::Bitmask => (1, 0),
            Output::Bias => (2, 0),
            Output::SparseBias(n) => (3, n),
        };
        self.result.output = kind;
        self.result.n_bias = n;
    }

    /// End the sequence after this step (after any backtrack and fast-forward).
    pub fn stop(&mut self) {
        self.result.action = 1;
    }

    /// Remove `n` tokens from the end of the sequence before fast-forwarding.
    pub fn backtrack(&mut self, n: u32) {
        self.result.backtrack = n;
    }

    /// Append `tokens` without sampling; [`Error::FAILED`] past [`MAX_FF_TOKENS`].
    pub fn fast_forward(&mut self, tokens: &[u32]) -> Result<(), Error> {
        let slot = self.result.ff_tokens.get_mut(..tokens.len()).ok_or(Error::FAILED)?;
        slot.copy_from_slice(tokens);
        self.result.n_ff = tokens.len() as u32;
        Ok(())
    }
}

/// A wasmshare controller: one instance per sequence, so `self` is that sequence's state.
pub trait Controller: Sized {
    /// Parse the argument and prepare, once, before the first step. An error fails the
    /// sequence before it starts (use it for a bad argument). Growing memory
    /// ([`grow`]) is allowed here and only here.
    fn create(ctx: &mut Create<'_>) -> Result<Self, Error>;

    /// Answer one decode step. Never allocate here.
    fn step(&mut self, step: &mut Step<'_>) -> Result<(), Error>;

    /// The sequence ended (the default does nothing).
    fn free(&mut self) {}
}

/// Element types a freshly grown, zeroed block can be viewed as.
///
/// # Safety
/// All-zero bytes must be a valid value of the type.
pub unsafe trait Zeroable: Copy {}
unsafe impl Zeroable for u8 {}
unsafe impl Zeroable for u16 {}
unsafe impl Zeroable for u32 {}
unsafe impl Zeroable for u64 {}
unsafe impl Zeroable for i32 {}
unsafe impl Zeroable for f32 {}

/// Grow linear memory by enough pages for `count` zeroed `T` and return them.
///
/// The pages are new, so nothing else refers to them; they are never given back.
/// `None` when memory cannot grow (the host's memory limit). Call it from `create`
/// only: a step must not allocate.
pub fn grow<T: Zeroable>(count: usize) -> Option<&'static mut [T]> {
    let bytes = count.checked_mul(size_of::<T>())?;
    if bytes == 0 {
        return Some(&mut []);
    }
    let pages = (bytes.checked_add(PAGE_SIZE - 1)?) / PAGE_SIZE;
    let old = memory_grow(pages)?;
    // SAFETY: the pages [old, old + pages) were just added, are zeroed and unaliased;
    // `T: Zeroable` makes zero bytes a valid value; pages are 64 KiB aligned.
    Some(unsafe { core::slice::from_raw_parts_mut((old * PAGE_SIZE) as *mut T, count) })
}

#[cfg(target_arch = "wasm32")]
fn memory_grow(pages: usize) -> Option<usize> {
    let old = core::arch::wasm32::memory_grow(0, pages);
    (old != usize::MAX).then(|| old)
}

#[cfg(not(target_arch = "wasm32"))]
fn memory_grow(_pages: usize) -> Option<usize> {
    None
}

/// Log `msg` on the host, tagged with the guest's name.
pub fn log(msg: &[u8]) {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: the host reads `len` bytes at `msg` during the call.
    unsafe {
        sys::ws_log(msg.as_ptr(), msg.len().min(i32::MAX as usize) as i32)
    }
    #[cfg(not(target_arch = "wasm32"))]
    let _ = msg;
}

/// How a region is borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Mapped read-only: a write traps.
    ReadOnly = 1,
    /// Mapped read-write.
    ReadWrite = 2,
}

/// Size in bytes of the region the host offers under `handle`.
#[cfg(target_arch = "wasm32")]
pub fn region_size(handle: i32) -> Result<u64, Error> {
    // SAFETY: a plain host call with integer arguments.
    let size = unsafe { sys::ws_region_size(handle) };
    if size < 0 {
        Err(Error(size as i32))
    } else {
        Ok(size as u64)
    }
}

/// A region the host offered, mapped into this guest (`ws_borrow`) until dropped.
///
/// The window also ends when the outermost host call into the guest returns, so keep
/// a `Borrow` on the stack of that call, never in a static: a later access traps.
#[cfg(target_arch = "wasm32")]
pub struct Borrow {
    handle: i32,
    ptr: *mut u8,
    len: usize,
    access: Access,
    _not_send: PhantomData<*mut u8>,
}

#[cfg(target_arch = "wasm32")]
impl Borrow {
    /// Map the region offered under `handle` with `access`.
    pub fn new(handle: i32, access: Access) -> Result<Borrow, Error> {
        let len = region_size(handle)?;
        // SAFETY: a plain host call; the host maps the region and returns its address.
        let addr = unsafe { sys::ws_borrow(handle, access as i32) };
        if addr == 0 {
            return Err(Error::FAILED);
        }
        let len = usize::try_from(len).map_err(|_| Error::FAILED)?;
        Ok(Borrow { handle, ptr: addr as u32 as usize as *mut u8, len, access, _not_send: PhantomData })
    }

    /// The region's bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the host mapped `len` bytes at `ptr` until release.
        unsafe { window(self.ptr, self.len) }
    }

    /// The region's bytes, writable; `None` for a read-only borrow.
    pub fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        // SAFETY: as `bytes`, and the borrow is read-write; `&mut self` is unique.
        (self.access == Access::ReadWrite).then(|| unsafe { window_mut(self.ptr, self.len) })
    }

    /// The region as whole `f32`s (the window is 64 KiB aligned).
    pub fn f32s(&self) -> &[f32] {
        // SAFETY: the window is page-aligned; every bit pattern is an f32.
        unsafe { window(self.ptr as *const f32, self.len / 4) }
    }

    /// The region as whole `f32`s, writable; `None` for a read-only borrow.
    pub fn f32s_mut(&mut self) -> Option<&mut [f32]> {
        // SAFETY: as `f32s`, and read-write.
        (self.access == Access::ReadWrite).then(|| unsafe { window_mut(self.ptr as *mut f32, self.len / 4) })
    }

    /// The region as whole `u32`s.
    pub fn u32s(&self) -> &[u32] {
        // SAFETY: page-aligned; every bit pattern is a u32.
        unsafe { window(self.ptr as *const u32, self.len / 4) }
    }

    /// The region as whole `u32`s, writable; `None` for a read-only borrow.
    pub fn u32s_mut(&mut self) -> Option<&mut [u32]> {
        // SAFETY: as `u32s`, and read-write.
        (self.access == Access::ReadWrite).then(|| unsafe { window_mut(self.ptr as *mut u32, self.len / 4) })
    }
}

#[cfg(target_arch = "wasm32")]
impl Drop for Borrow {
    fn drop(&mut self) {
        // SAFETY: ends this borrow; nothing refers to the window past `&mut self`.
        unsafe {
            sys::ws_release(self.handle);
        }
    }
}

/// What a [`Constraint`]'s spec is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConstraintKind {
    /// A JSON Schema (its text).
    JsonSchema = 1,
    /// A regular expression.
    Regex = 2,
    /// A Lark grammar.
    Grammar = 3,
    /// A JSON list of strings: exactly one of them.
    Choice = 4,
    /// A JSON list of strings: any text, stopped once one of them appears.
    Stop = 5,
}

/// A constraint compiled by the host's grammar engine (`ws_constraint_*`); closed on drop.
#[cfg(target_arch = "wasm32")]
pub struct Constraint {
    handle: i32,
}

#[cfg(target_arch = "wasm32")]
impl Constraint {
    /// Compile `spec` (cached by the host by spec and tokenizer).
    pub fn open(kind: ConstraintKind, spec: &[u8]) -> Result<Constraint, Error> {
        let len = i32::try_from(spec.len()).map_err(|_| Error::CONSTRAINT_SPEC)?;
        // SAFETY: the host reads `len` bytes at `spec` during the call.
        let handle = status(unsafe { sys::ws_constraint_open(kind as i32, spec.as_ptr(), len) })?;
        Ok(Constraint { handle })
    }

    /// Have the host write the mask of the current state into `mask` (pass the mask row).
    pub fn fill_mask(&self, mask: &mut [u32]) -> Result<(), Error> {
        let words = i32::try_from(mask.len()).map_err(|_| Error::FAILED)?;
        // SAFETY: the host writes at most `words` words at `mask`.
        status(unsafe { sys::ws_constraint_fill_mask(self.handle, mask.as_mut_ptr(), words) }).map(drop)
    }

    /// Advance by a sampled token; [`Error::CONSTRAINT_REJECTED`] if it is not allowed.
    pub fn consume(&self, token: u32) -> Result<(), Error> {
        // SAFETY: a plain host call.
        status(unsafe { sys::ws_constraint_consume(self.handle, token) }).map(drop)
    }

    /// Whether the text so far is a complete match.
    pub fn is_accepting(&self) -> bool {
        // SAFETY: a plain host call.
        unsafe { sys::ws_constraint_is_accepting(self.handle) == 1 }
    }

    /// Whether nothing but end-of-sequence may follow.
    pub fn is_stopped(&self) -> bool {
        // SAFETY: a plain host call.
        unsafe { sys::ws_constraint_is_stopped(self.handle) == 1 }
    }
}

#[cfg(target_arch = "wasm32")]
impl Drop for Constraint {
    fn drop(&mut self) {
        // SAFETY: forgets the host's constraint; the handle is not used again.
        unsafe {
            sys::ws_constraint_close(self.handle);
        }
    }
}

/// Export `ws_abi_version` (every wasmshare guest does; the host checks it first).
#[macro_export]
macro_rules! abi_version {
    () => {
        #[no_mangle]
        pub extern "C" fn ws_abi_version() -> i32 {
            $crate::ABI_VERSION
        }
    };
}

/// Export a [`Controller`] type as this module's controller (the `ws_ctrl_*` exports).
///
/// Use it once per module, at the crate root.
#[macro_export]
macro_rules! controller {
    ($ty:ty) => {
        $crate::abi_version!();

        static mut __WASMSHARE_CONTROLLER: Option<$ty> = None;

        #[no_mangle]
        pub extern "C" fn ws_ctrl_abi_version() -> i32 {
            $crate::CONTROLLER_ABI_VERSION
        }

        /// # Safety
        /// Called by the host only, with its step record.
        #[no_mangle]
        pub unsafe extern "C" fn ws_ctrl_create(
            input: *const $crate::sys::StepInput,
            result: *mut $crate::sys::StepResult,
        ) -> i32 {
            $crate::__private::create::<$ty>(&mut *::core::ptr::addr_of_mut!(__WASMSHARE_CONTROLLER), input, result)
        }

        /// # Safety
        /// Called by the host only, with its step record.
        #[no_mangle]
        pub unsafe extern "C" fn ws_ctrl_step(
            input: *const $crate::sys::StepInput,
            result: *mut $crate::sys::StepResult,
        ) -> i32 {
            $crate::__private::step::<$ty>(&mut *::core::ptr::addr_of_mut!(__WASMSHARE_CONTROLLER), input, result)
        }

        /// # Safety
        /// Called by the host only, once, when the sequence ends.
        #[no_mangle]
        pub unsafe extern "C" fn ws_ctrl_free() {
            $crate::__private::free::<$ty>(&mut *::core::ptr::addr_of_mut!(__WASMSHARE_CONTROLLER))
        }
    };
}

/// What the macros expand to; not part of the API.
#[doc(hidden)]
pub mod __private {
    use super::{sys, Controller, Create, Slots, Step};

    /// # Safety
    /// `input` and `result` are the host's step record for this call.
    pub unsafe fn create<T: Controller>(
        state: &mut Option<T>,
        input: *const sys::StepInput,
        result: *mut sys::StepResult,
    ) -> i32 {
        let _ = result; // reserved at create: the host ignores it
        if input.is_null() {
            return super::Error::FAILED.0;
        }
        let mut ctx = Create { slots: Slots { input: &*input } };
        match T::create(&mut ctx) {
            Ok(controller) => {
                *state = Some(controller);
                0
            }
            Err(e) => e.0.min(-1),
        }
    }

    /// # Safety
    /// `input` and `result` are the host's step record for this call.
    pub unsafe fn step<T: Controller>(
        state: &mut Option<T>,
        input: *const sys::StepInput,
        result: *mut sys::StepResult,
    ) -> i32 {
        let controller = match state.as_mut() {
            Some(c) => c,
            None => return super::Error::FAILED.0,
        };
        if input.is_null() || result.is_null() {
            return super::Error::FAILED.0;
        }
        let mut step = Step { slots: Slots { input: &*input }, result: &mut *result };
        match controller.step(&mut step) {
            Ok(()) => 0,
            Err(e) => e.0.min(-1),
        }
    }

    /// Drop the sequence's state.
    pub fn free<T: Controller>(state: &mut Option<T>) {
        if let Some(mut controller) = state.take() {
            controller.free();
        }
    }
}

/// A panic traps after logging where it happened: the host ends this guest alone.
#[cfg(all(target_arch = "wasm32", not(test)))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    let mut line = Line { buf: [0; 256], len: 0 };
    line.push(b"panicked");
    if let Some(at) = info.location() {
        line.push(b" at ");
        line.push(at.file().as_bytes());
        line.push(b":");
        line.number(at.line());
    }
    log(&line.buf[..line.len]);
    core::arch::wasm32::unreachable()
}

/// A fixed buffer for the panic line: the handler must not allocate or format.
#[cfg(all(target_arch = "wasm32", not(test)))]
struct Line {
    buf: [u8; 256],
    len: usize,
}

#[cfg(all(target_arch = "wasm32", not(test)))]
impl Line {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn number(&mut self, mut n: u32) {
        let mut digits = [0u8; 10];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}
