/**
 * The process that makes the disk pool's entries (disk-pool.ts), a child of
 * the server. Why a process of its own: Node starts a program by forking
 * itself, which stops the server's event loop for as long as copying its page
 * tables takes (about 4 ms at 150 MB of RSS, growing with it); mkfs.ext4 and
 * mount for every entry would put that on the requests the pool is meant to
 * speed up. Started from this small process, they cost the server nothing.
 *
 * Messages on the IPC channel: `{ entry, bytes, inodes }` in, `{ entry }` or
 * `{ entry, error }` out, one at a time. It exits when the server disconnects.
 */
import { mkdir, rename, rm } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { IMAGE, makeImage, mountImage } from "./disk-image.ts";

export interface MakeRequest {
  /** The entry to make, `making-<id>`; renamed to `ready` when whole. */
  entry: string;
  ready: string;
  bytes: number;
  inodes: number;
}

export interface MakeReply {
  entry: string;
  error?: string;
}

/**
 * One pool entry laid out as a new VM directory: `disk.ext4` made and mounted
 * at `root/` as vm-disk.ts does for a new VM (`lost+found` removed as there),
 * and an empty `etc/`; the caller made `entry` (0700). Renamed to `ready` when whole.
 */
export async function makeEntry(request: MakeRequest): Promise<void> {
  const root = join(request.entry, "root");
  await mkdir(join(request.entry, "etc"));
  await makeImage(join(request.entry, IMAGE), { bytes: request.bytes, inodes: request.inodes });
  await mkdir(root);
  await mountImage(join(request.entry, IMAGE), root);
  await rm(join(root, "lost+found"), { recursive: true, force: true });
  await rename(request.entry, request.ready);
}

// Only as a program of its own (the server imports the types above, never this).
if (process.send && process.argv[1] === fileURLToPath(import.meta.url)) {
  process.on("message", (request: MakeRequest) => {
    makeEntry(request).then(
      () => process.send!({ entry: request.entry } satisfies MakeReply),
      (error: Error) => process.send!({ entry: request.entry, error: error.message.split("\n")[0] } satisfies MakeReply),
    );
  });
  process.on("disconnect", () => process.exit(0));
}
