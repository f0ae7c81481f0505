//! allow_list: a controller that only ever allows a fixed set of tokens (twin of
//! guests/controllers/allow_list.c).
//!
//! Argument: little-endian u32 token ids, `arg.len / 4` of them (at least one, each below
//! V, at most 65536). The first step clears the mask row and allows exactly these ids;
//! later steps answer `bitmask` without touching the row, which keeps its contents
//! between steps, so a step costs a few instructions.
const std = @import("std");
const ws = @import("wasmshare");

const allow_max = 65536;

var ids_buf: [allow_max]u32 = undefined;

const AllowList = struct {
    ids: []const u32,
    written: bool,

    pub fn create(ctx: *ws.Create) !AllowList {
        const a = ws.arg(ctx.in);
        if (a.len == 0 or a.len % 4 != 0 or a.len / 4 > allow_max) return error.BadArgument;
        const n = a.len / 4;
        for (ids_buf[0..n], 0..) |*slot, i| {
            const id = std.mem.readInt(u32, a[4 * i ..][0..4], .little);
            if (id >= ctx.in.vocab_size) return error.BadArgument;
            slot.* = id;
        }
        return .{ .ids = ids_buf[0..n], .written = false };
    }

    pub fn step(self: *AllowList, s: *ws.Step) !void {
        if (!self.written) {
            const row = ws.mask(s.in); // the host's batch row, in place
            ws.maskClear(row);
            for (self.ids) |id| ws.maskAllow(row, id);
            self.written = true;
        }
        s.answer(.bitmask);
    }
};

comptime {
    ws.exportController(AllowList);
}
