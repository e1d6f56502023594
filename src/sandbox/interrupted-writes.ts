/**
 * writeFile writes a temporary file beside its target and renames it into place,
 * so readers see the old content or the new, never a partial write. A crash
 * between the two leaves the temporary file behind. Those files are hidden from
 * readdir and removed the next time the VM starts after an unclean stop.
 *
 * "Unclean" is a marker file in the VM's directory, written when a VM starts and
 * removed when it is disposed: only a start that finds it walks the VM's files,
 * so a clean wake costs nothing however many files the VM holds.
 */
import { opendir, rm, unlink, writeFile } from "node:fs/promises";
import { join } from "node:path";

/** What writeFile names its temporary files; nothing else in a VM is hidden or removed. */
export const TEMP_FILE_PATTERN = /^\.agentvm-\d+-\d+-[a-z0-9]*\.tmp$/;

let counter = 0;

export function tempFileName(): string {
  return `.agentvm-${process.pid}-${++counter}-${Math.random().toString(36).slice(2, 10)}.tmp`;
}

const MARKER = "running";

/** Called as a VM starts: cleans up after an unclean stop, then marks this run. Returns how many files it removed. */
export async function beginRun(vmDir: string, root: string): Promise<number> {
  const marker = join(vmDir, MARKER);
  let removed = 0;
  try {
    await writeFile(marker, String(process.pid), { flag: "wx" });
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "EEXIST") throw error;
    removed = await removeTempFiles(root);
  }
  return removed;
}

/** Called once a VM is disposed: its writes all finished or were cleaned up. */
export async function endRun(vmDir: string): Promise<void> {
  await rm(join(vmDir, MARKER), { force: true });
}

/** Removes writeFile's temporary files under `dir`, never following symlinks. */
export async function removeTempFiles(dir: string): Promise<number> {
  let removed = 0;
  const pending = [dir];
  while (pending.length > 0) {
    const current = pending.pop()!;
    let entries;
    try {
      entries = await opendir(current);
    } catch {
      continue; // gone or unreadable: nothing of ours to clean there
    }
    for await (const entry of entries) {
      const path = join(current, entry.name);
      if (entry.isDirectory()) pending.push(path);
      else if (entry.isFile() && TEMP_FILE_PATTERN.test(entry.name)) {
        await unlink(path).then(() => removed++, () => undefined);
      }
    }
  }
  return removed;
}
