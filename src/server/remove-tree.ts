/**
 * Removing a VM's directory for good. A guest may have left directories it
 * cannot write (`chmod 500 dir`), which `rm -r` cannot empty; they belong to
 * the server's user, so they are made writable (never following symlinks) and
 * the removal is tried once more.
 */
import { chmod, lstat, readdir, rm } from "node:fs/promises";
import { join } from "node:path";

export async function removeTree(path: string): Promise<void> {
  try {
    await rm(path, { recursive: true, force: true, maxRetries: 2 });
    return;
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code !== "EACCES" && code !== "EPERM" && code !== "ENOTEMPTY") throw error;
  }
  await makeDirectoriesWritable(path);
  await rm(path, { recursive: true, force: true, maxRetries: 2 });
}

async function makeDirectoriesWritable(path: string): Promise<void> {
  const pending = [path];
  for (let next = pending.pop(); next !== undefined; next = pending.pop()) {
    const stat = await lstat(next).catch(() => undefined);
    if (!stat?.isDirectory()) continue;
    await chmod(next, 0o700);
    for (const name of await readdir(next)) pending.push(join(next, name));
  }
}
