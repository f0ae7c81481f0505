//! allow_list: a controller that only ever allows a fixed set of tokens; the twin of
//! guests/controllers/allow_list.c (same argument, same rejections, same rows).
//!
//! Argument: little-endian u32 token ids, `arg.len / 4` of them (at least one, each below
//! V, at most 65536). Example (Python): `struct.pack("<3I", 5, 17, 42)`.
//!
//! create: checks and stores the ids.
//! step:   the first step clears the mask row and allows exactly these ids, then answers
//!         `bitmask`. Later steps answer `bitmask` without touching the row: it is this
//!         controller's own row of the batch tensor and keeps its contents between steps,
//!         so a step costs a few instructions. The benchmark's trivial allow-list controller.
const std = @import("std");
const ws = @import("wasmshare");

const allow_max = 65536;

/// The ids, in static memory: a step must not allocate, and each sequence has its own
/// instance of the module, so a global is this sequence's own.
var ids_buf: [allow_max]u32 = undefined;

const AllowList = struct {
    ids: []const u32,
    written: bool,

    pub fn create(ctx: *ws.Create) !AllowList {
        const a = ctx.arg();
        if (a.len == 0 or a.len % 4 != 0 or a.len / 4 > allow_max) return error.BadArgument;
        const n = a.len / 4;
        for (ids_buf[0..n], 0..) |*slot, i| {
            const id = std.mem.readInt(u32, a[4 * i ..][0..4], .little);
            if (id >= ctx.vocabSize()) return error.BadArgument;
            slot.* = id;
        }
        return .{ .ids = ids_buf[0..n], .written = false };
    }

    pub fn step(self: *AllowList, s: *ws.Step) !void {
        if (!self.written) {
            const row: []u32 = s.mask(); // the host's batch row, in place
            ws.maskClear(row);
            for (self.ids) |id| ws.maskAllow(row, id);
            self.written = true;
        }
        s.answer(.bitmask);
    }
};

/// A failed safety check traps at once; like the C twin, the module imports nothing.
pub const panic = ws.trap_panic;

comptime {
    ws.exportController(AllowList);
}
