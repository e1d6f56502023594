/**
 * Host-side access to one VM's files. The VM's `/` is a real directory on the
 * host, and the guest can put anything in it, symlinks and hard links included,
 * and change it while the server works there. So every path is resolved here
 * the way a chroot would resolve it, never the way the host would, and every
 * action is taken relative to directories opened on the way (through
 * /proc/self/fd, Node's stand-in for openat) with O_NOFOLLOW: a guest that
 * swaps a directory for a symlink mid-action makes the action fail, and no
 * interleaving of renames and symlinks reaches a host path.
 */
import * as fs from "node:fs/promises";
import { constants } from "node:fs";
import type { Stats } from "node:fs";
import * as path from "node:path";
import { AgentVmError, invalidArgument, type ErrorCode, POSIX_CODES } from "../errors.ts";
import { TEMP_FILE_PATTERN, tempFileName } from "./interrupted-writes.ts";
import { describe, expectKnownKeys, expectObject, expectString, expectStringArray, toBytes } from "../validate.ts";

export interface VmStat {
  type: "file" | "directory" | "symlink" | "other";
  size: number;
  /** The full st_mode, file-type bits included, as Node's fs.Stats gives it. */
  mode: number;
  mtimeMs: number;
  ctimeMs: number;
  isFile: boolean;
  isDirectory: boolean;
  isSymbolicLink: boolean;
}

const DEFAULT_READ_ONLY: readonly string[] = [
  "/usr",
  "/lib",
  "/lib64",
  "/bin",
  "/sbin",
  "/opt/node",
  "/opt/agentvm",
  "/proc",
  "/dev",
  "/sys",
];

/** Linux's PATH_MAX; longer paths cannot name anything anyway. */
const MAX_PATH = 4096;
/** Linux's MAXSYMLINKS, so guests see the same ELOOP behaviour as in the kernel. */
const MAX_SYMLINK_HOPS = 40;

type Op = "readFile" | "writeFile" | "mkdir" | "readdir" | "stat" | "lstat" | "exists" | "deleteFile" | "move" | "hostPath" | "readlink" | "symlink" | "chmod";

/** How a write lands: `mode` (permission bits, default 0644), `append` to what the file holds. */
export interface WriteOptions {
  mode?: number;
  append?: boolean;
}

/**
 * Where tar extraction may write: the resolved path must stay inside `within`
 * (a guest directory), and a final symlink is replaced, never followed.
 */
interface ConfineOptions {
  within?: string;
}

/** A regular file opened for reading; the caller closes `handle`. */
export interface OpenedFile {
  handle: fs.FileHandle;
  size: number;
  /** Permission bits (no file-type bits). */
  mode: number;
}

/**
 * A write in progress. Nothing is visible under the final name until commit():
 * a new file is written to a temporary name in the same directory and renamed;
 * an append goes to the file itself and abort() cuts it back to its old length.
 */
export interface FileWriter {
  readonly handle: fs.FileHandle;
  /** Writes all of `data` at the end of what was written so far; a full disk is VM_DISK_FULL. */
  write(data: Uint8Array): Promise<void>;
  commit(): Promise<void>;
  /** Undoes the write (removes the temporary file, or truncates an append); never throws. */
  abort(): Promise<void>;
}

/** Permission bits a write may set: setuid, setgid and sticky are not among them. */
export const MAX_WRITE_MODE = 0o777;

interface Resolved {
  /** The guest path after symlink resolution (a final symlink kept when not following). */
  guest: string;
  /** Components of `guest`; the first `existing` of them were found on disk. */
  parts: string[];
  existing: number;
  /** lstat of the final component, or null when it does not exist. */
  stats: Stats | null;
  /** Open directories along the path: dirs[i] is the one parts[0..i) names, dirs[0] the VM's root. */
  dirs: fs.FileHandle[];
  /** The final component's directory and name, once that directory exists. */
  final: { dir: fs.FileHandle; name: string } | undefined;
  /** Every descriptor the walk opened; closed by release(). */
  opened: fs.FileHandle[];
}

/** Where an open directory's descriptor, and a name in it, are reachable by path: openat for fs/promises. */
const FD_DIR = "/proc/self/fd";
const DIRECTORY = constants.O_RDONLY | constants.O_DIRECTORY | constants.O_NOFOLLOW;

function at(dir: fs.FileHandle, name?: string): string {
  return name === undefined ? `${FD_DIR}/${dir.fd}` : `${FD_DIR}/${dir.fd}/${name}`;
}

async function release(r: Resolved): Promise<void> {
  await Promise.all(r.opened.map((handle) => handle.close().catch(() => {})));
}

/** rm -r relative to open directories: nothing a guest swaps in while it runs is followed. */
async function removeTree(parent: fs.FileHandle, name: string): Promise<void> {
  const dir = await fs.open(at(parent, name), DIRECTORY);
  try {
    for (const entry of await fs.readdir(at(dir))) {
      if ((await fs.lstat(at(dir, entry))).isDirectory()) await removeTree(dir, entry);
      else await fs.unlink(at(dir, entry));
    }
  } finally {
    await dir.close();
  }
  await fs.rmdir(at(parent, name));
}

const POSIX: ReadonlySet<string> = new Set<string>(POSIX_CODES);

export class VmFilesystem {
  static readonly HOME = "/home/agentos";

  readonly #root: string;
  readonly #readOnly: readonly string[];
  /**
   * Guest paths served from other host locations, as the sandbox mounts them
   * (the image's directories, per-VM files over the image's placeholders),
   * longest first. Each is read-only here: list it in `readOnly` too.
   */
  readonly #mounts: readonly [guest: string, host: string][];
  /** realpath of the root, so containment checks compare like with like. */
  #realRoot: string | undefined;
  /** The host id that owns what the server creates, so guests own it too (the VM's guests' id; see guest-identity.ts). */
  readonly #owner: { uid: number; gid: number } | undefined;

  constructor(root: string, options?: { readOnly?: readonly string[]; mounts?: Readonly<Record<string, string>>; owner?: { uid: number; gid: number } }) {
    expectString("root", root, { nonEmpty: true, max: MAX_PATH });
    if (!path.isAbsolute(root)) throw invalidArgument(`root must be an absolute host directory, got ${describe(root)}`);
    this.#root = path.resolve(root);
    let readOnly = DEFAULT_READ_ONLY;
    if (options !== undefined) {
      const opts = expectObject("options", options);
      expectKnownKeys("options", opts, ["readOnly", "mounts", "owner"]);
      if (opts.readOnly !== undefined) {
        readOnly = expectStringArray("options.readOnly", opts.readOnly).map((p, i) => {
          if (!p.startsWith("/")) {
            throw invalidArgument(`options.readOnly[${i}] must be an absolute guest path, got ${describe(p)}`);
          }
          return normalise(`options.readOnly[${i}]`, p);
        });
      }
    }
    this.#readOnly = readOnly;
    this.#owner = options?.owner;
    this.#mounts = Object.entries(options?.mounts ?? {})
      .map(([guest, host]): [string, string] => [normalise("options.mounts", guest), path.resolve(host)])
      .sort((a, b) => b[0].length - a[0].length);
  }

  /** The host path of resolved guest components: under a mount when one covers them, else under the root. */
  #hostOf(root: string, parts: readonly string[]): string {
    const guest = `/${parts.join("/")}`;
    for (const [prefix, host] of this.#mounts) {
      if (guest === prefix) return host;
      if (guest.startsWith(`${prefix}/`)) return path.join(host, guest.slice(prefix.length + 1));
    }
    return path.join(root, ...parts);
  }

  async writeFile(file: string, data: string | Uint8Array, options?: WriteOptions): Promise<void> {
    const bytes = toBytes("data", data);
    const writer = await this.openWrite(file, options);
    try {
      await writer.write(bytes);
      await writer.commit();
    } catch (err) {
      await writer.abort();
      throw fsError(err, "writeFile", normalise("path", file));
    }
  }

  /** Opens a file for a streamed write; see FileWriter. */
  async openWrite(file: string, options?: WriteOptions & ConfineOptions): Promise<FileWriter> {
    const op = "writeFile";
    const guest = normalise("path", file);
    const { mode, append, within } = readWriteOptions(options);
    this.#checkWritable(op, guest);
    // Tar extraction replaces a final symlink instead of writing through it.
    const r = await this.#resolve(op, guest, within === undefined);
    let target: { dir: fs.FileHandle; name: string };
    try {
      this.#checkWritable(op, guest, r.guest);
      checkWithin(op, guest, r, within);
      if (r.stats?.isDirectory()) {
        throw fail("EISDIR", op, guest, r, "is a directory", "write to a file path inside it, or delete the directory first");
      }
      if (r.stats?.isFile() && r.stats.nlink > 1) throw hardLink(op, guest, r);
      target = await this.#finalEntry(op, guest, r);
      if (append && r.stats?.isFile()) {
        const writer = await this.#openAppend(op, guest, r, target, mode);
        await release(r);
        return writer;
      }
    } catch (err) {
      await release(r);
      throw err;
    }

    // Same directory as the target so the rename is atomic: readers see the old
    // content or the new, never a partial write. The directory stays open until
    // commit or abort, so the rename lands where the walk checked.
    const temp = tempFileName();
    let handle: fs.FileHandle;
    try {
      handle = await fs.open(at(target.dir, temp), constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
    } catch (err) {
      await release(r);
      throw fsError(err, op, guest, r);
    }
    // A streamed write may take long: of the walk's directories only the target's stays open.
    await Promise.all(r.opened.filter((dir) => dir !== target.dir).map((dir) => dir.close().catch(() => {})));
    r.opened = [target.dir];
    const owner = this.#owner;
    return fileWriter(handle, op, guest, r, {
      async commit() {
        try {
          // The open mode is filtered by the host's umask; set the bits the guest asked for.
          await handle.chmod(mode ?? 0o644);
          if (owner) await handle.chown(owner.uid, owner.gid);
          await handle.close();
          await fs.rename(at(target.dir, temp), at(target.dir, target.name));
        } catch (err) {
          await handle.close().catch(() => {});
          await fs.unlink(at(target.dir, temp)).catch(() => {});
          throw err;
        } finally {
          await release(r);
        }
      },
      async abort() {
        await handle.close().catch(() => {});
        await fs.unlink(at(target.dir, temp)).catch(() => {});
        await release(r);
      },
    });
  }

  /** An append to the existing file at `target` (the caller releases the walk: the open file is all the writer needs). */
  async #openAppend(op: Op, guest: string, r: Resolved, target: { dir: fs.FileHandle; name: string }, mode: number | undefined): Promise<FileWriter> {
    let handle: fs.FileHandle;
    try {
      handle = await fs.open(at(target.dir, target.name), constants.O_WRONLY | constants.O_APPEND | constants.O_NOFOLLOW | constants.O_NONBLOCK);
    } catch (err) {
      throw fsError(err, op, guest, r);
    }
    let length: number;
    try {
      // Checked on the open descriptor, so what we append to is what we checked.
      const st = await handle.stat();
      if (!st.isFile()) throw fail("EINVAL", op, guest, r, "is not a regular file", "append only to regular files");
      if (st.nlink > 1) throw hardLink(op, guest, r);
      length = st.size;
    } catch (err) {
      await handle.close();
      throw fsError(err, op, guest, r);
    }
    return fileWriter(handle, op, guest, r, {
      async commit() {
        try {
          if (mode !== undefined) await handle.chmod(mode);
        } finally {
          await handle.close();
        }
      },
      async abort() {
        // The append never happened: the file is cut back to what it held.
        await handle.truncate(length).catch(() => {});
        await handle.close().catch(() => {});
      },
    });
  }

  async readFile(file: string): Promise<Uint8Array> {
    const { handle } = await this.openRead(file);
    try {
      return await handle.readFile();
    } catch (err) {
      throw fsError(err, "readFile", normalise("path", file));
    } finally {
      await handle.close();
    }
  }

  /** Opens a regular file for a streamed read; the caller closes the handle. */
  async openRead(file: string): Promise<OpenedFile> {
    const op = "readFile";
    const guest = normalise("path", file);
    const r = await this.#resolve(op, guest, true);
    let handle: fs.FileHandle;
    try {
      if (!r.stats) throw fail("ENOENT", op, guest, r, "no such file", "create it with writeFile first");
      if (r.stats.isDirectory()) throw fail("EISDIR", op, guest, r, "is a directory", "use readdir to list it");
      try {
        // O_NOFOLLOW: a symlink swapped in after resolution fails instead of
        // being followed. O_NONBLOCK: opening a guest-made FIFO must not hang the host.
        handle = await fs.open(this.#pathOf(r), constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
      } catch (err) {
        throw fsError(err, op, guest, r);
      }
    } finally {
      await release(r);
    }
    try {
      // Checked on the open descriptor, so what we read is what we checked.
      const st = await handle.stat();
      if (st.isDirectory()) throw fail("EISDIR", op, guest, r, "is a directory", "use readdir to list it");
      if (!st.isFile()) {
        throw fail("EINVAL", op, guest, r, "is not a regular file (a FIFO, socket or device)", "only regular files can be read from the host");
      }
      if (st.nlink > 1) throw hardLink(op, guest, r);
      return { handle, size: st.size, mode: st.mode & 0o7777 };
    } catch (err) {
      await handle.close();
      throw fsError(err, op, guest, r);
    }
  }

  /**
   * An open directory to walk a tree from (tar packing): its entries are listed,
   * lstat'ed and opened relative to its descriptor, so a walk costs one open per
   * directory rather than a walk from the VM's root per entry. Symlinks in it are
   * reported, never followed. The caller closes it.
   */
  async openDirectory(dir: string): Promise<VmDirectory> {
    const op = "readdir";
    const guest = normalise("path", dir);
    const r = await this.#resolve(op, guest, true);
    try {
      if (!r.stats) throw fail("ENOENT", op, guest, r, "no such directory", "create it with mkdir first");
      if (!r.stats.isDirectory()) throw fail("ENOTDIR", op, guest, r, "is not a directory", "use readFile or stat on it instead");
      let handle: fs.FileHandle;
      try {
        // The root has no final component to open relative to a parent: it is opened again where it is.
        handle = await fs.open(r.final ? this.#pathOf(r) : await this.#rootPath(op, guest), DIRECTORY);
      } catch (err) {
        throw fsError(err, op, guest, r);
      }
      return new VmDirectory(this, handle, r.guest, (child) => this.#mountAt(splitGuest(child)) !== undefined);
    } finally {
      await release(r);
    }
  }

  /** The target of a symlink, as the guest wrote it. */
  async readlink(file: string): Promise<string> {
    const op = "readlink";
    const guest = normalise("path", file);
    const r = await this.#resolve(op, guest, false);
    try {
      if (!r.stats) throw fail("ENOENT", op, guest, r, "no such file or directory", "check the path with exists() or readdir() of its parent");
      if (!r.stats.isSymbolicLink()) throw fail("EINVAL", op, guest, r, "is not a symbolic link", "use stat or readFile on it instead");
      try {
        // readlink never follows the final component; a link swapped for a file is EINVAL.
        return await fs.readlink(this.#pathOf(r));
      } catch (err) {
        throw fsError(err, op, guest, r);
      }
    } finally {
      await release(r);
    }
  }

  /**
   * Makes `file` a symlink to `target` (any text: it is interpreted inside the
   * VM, never on the host), replacing a file or symlink already there.
   */
  async symlink(target: string, file: string, options?: ConfineOptions): Promise<void> {
    const op = "symlink";
    const guest = normalise("path", file);
    const linkTarget = expectString("target", target, { nonEmpty: true, max: MAX_PATH });
    const within = readWithin(options);
    this.#checkRemovable(op, guest);
    const r = await this.#resolve(op, guest, false);
    try {
      this.#checkRemovable(op, guest, r.guest);
      checkWithin(op, guest, r, within);
      if (r.stats?.isDirectory()) throw fail("EEXIST", op, guest, r, "is a directory", "delete it first");
      const entry = await this.#finalEntry(op, guest, r);
      try {
        // unlink never follows a symlink, and refuses (EISDIR) a directory swapped in meanwhile.
        if (r.stats) await fs.unlink(at(entry.dir, entry.name));
        await fs.symlink(linkTarget, at(entry.dir, entry.name));
        await this.#own(at(entry.dir, entry.name));
      } catch (err) {
        throw fsError(err, op, guest, r);
      }
    } finally {
      await release(r);
    }
  }

  /** Sets permission bits (at most 0777: never setuid, setgid or sticky); a symlink is left as it is. */
  async chmod(file: string, mode: number, options?: ConfineOptions): Promise<void> {
    const op = "chmod";
    const guest = normalise("path", file);
    const bits = readMode("mode", mode);
    const within = readWithin(options);
    this.#checkWritable(op, guest);
    const r = await this.#resolve(op, guest, false);
    try {
      this.#checkWritable(op, guest, r.guest);
      checkWithin(op, guest, r, within);
      if (!r.stats) throw fail("ENOENT", op, guest, r, "no such file or directory", "check the path with exists() or readdir() of its parent");
      if (r.stats.isSymbolicLink()) return;
      // chmod(2) follows symlinks and Linux has no lchmod: open the entry with
      // O_NOFOLLOW and fchmod the descriptor, so a symlink swapped in fails instead.
      // The root has no entry to open: its descriptor from the walk is used.
      let handle: fs.FileHandle | undefined;
      try {
        if (r.final) handle = await fs.open(this.#pathOf(r), constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
      } catch (err) {
        throw fsError(err, op, guest, r);
      }
      const target = handle ?? r.dirs[0]!;
      try {
        const st = await target.stat();
        if (!st.isDirectory() && st.nlink > 1) throw hardLink(op, guest, r);
        await target.chmod(bits);
      } catch (err) {
        throw fsError(err, op, guest, r);
      } finally {
        await handle?.close();
      }
    } finally {
      await release(r);
    }
  }

  async mkdir(dir: string, options: { recursive?: boolean } = {}): Promise<void> {
    return this.#mkdir(dir, readRecursive(options), undefined);
  }

  /** mkdir -p for tar extraction: the directory must resolve inside `within`. */
  async mkdirWithin(dir: string, within: string): Promise<void> {
    return this.#mkdir(dir, true, normalise("within", within));
  }

  async #mkdir(dir: string, recursive: boolean, within: string | undefined): Promise<void> {
    const op = "mkdir";
    const guest = normalise("path", dir);
    this.#checkWritable(op, guest);
    const r = await this.#resolve(op, guest, recursive);
    try {
      this.#checkWritable(op, guest, r.guest);
      checkWithin(op, guest, r, within);
      if (r.stats) {
        if (recursive && r.stats.isDirectory()) return;
        if (recursive) throw fail("EEXIST", op, guest, r, "already exists and is not a directory", "choose another name or delete the file first");
        throw fail("EEXIST", op, guest, r, "already exists", "pass { recursive: true } to accept an existing directory");
      }
      if (!recursive && r.existing < r.parts.length - 1) {
        throw fail("ENOENT", op, guest, r, "the parent directory does not exist", "pass { recursive: true } to create parents too");
      }
      const target = await this.#finalEntry(op, guest, r);
      try {
        await fs.mkdir(at(target.dir, target.name));
        await this.#own(at(target.dir, target.name));
      } catch (err) {
        throw fsError(err, op, guest, r);
      }
    } finally {
      await release(r);
    }
  }

  async readdir(dir: string): Promise<string[]> {
    const op = "readdir";
    const guest = normalise("path", dir);
    const r = await this.#resolve(op, guest, true);
    try {
      if (!r.stats) throw fail("ENOENT", op, guest, r, "no such directory", "create it with mkdir first");
      if (!r.stats.isDirectory()) throw fail("ENOTDIR", op, guest, r, "is not a directory", "use readFile or stat on it instead");
      try {
        const handle = r.final ? await fs.open(this.#pathOf(r), DIRECTORY) : undefined;
        try {
          // A write in flight (or one a crash interrupted) is not a file of the guest's.
          return (await fs.readdir(at(handle ?? r.dirs[0]!))).filter((name) => !TEMP_FILE_PATTERN.test(name)).sort();
        } finally {
          await handle?.close();
        }
      } catch (err) {
        throw fsError(err, op, guest, r);
      }
    } finally {
      await release(r);
    }
  }

  stat(file: string): Promise<VmStat> {
    return this.#stat("stat", file, true);
  }

  /** Like stat, but describes a symlink itself rather than its target. */
  lstat(file: string): Promise<VmStat> {
    return this.#stat("lstat", file, false);
  }

  async exists(file: string): Promise<boolean> {
    const op = "exists";
    const guest = normalise("path", file);
    try {
      const r = await this.#resolve(op, guest, true);
      await release(r);
      return r.stats !== null;
    } catch (err) {
      if (err instanceof AgentVmError && (err.code === "ENOENT" || err.code === "ENOTDIR" || err.code === "PATH_OUTSIDE_VM")) {
        return false;
      }
      throw err;
    }
  }

  async deleteFile(file: string, options: { recursive?: boolean } = {}): Promise<void> {
    const op = "deleteFile";
    const guest = normalise("path", file);
    const recursive = readRecursive(options);
    this.#checkRemovable(op, guest);
    const r = await this.#resolve(op, guest, false);
    try {
      this.#checkRemovable(op, guest, r.guest);
      if (!r.stats || !r.final) throw fail("ENOENT", op, guest, r, "no such file or directory", "check the path with exists() or readdir() of its parent");
      try {
        if (r.stats.isDirectory()) {
          if (!recursive) {
            throw fail("EISDIR", op, guest, r, "is a directory", "pass { recursive: true } to delete it and everything in it");
          }
          await removeTree(r.final.dir, r.final.name);
        } else {
          await fs.unlink(this.#pathOf(r));
        }
      } catch (err) {
        throw fsError(err, op, guest, r);
      }
    } finally {
      await release(r);
    }
  }

  async move(from: string, to: string): Promise<void> {
    const op = "move";
    const src = normalise("from", from);
    const dst = normalise("to", to);
    const label = `${src} -> ${dst}`;
    this.#checkRemovable(op, src);
    this.#checkRemovable(op, dst);
    // Both ends keep a final symlink as is: moving a link moves the link.
    const rs = await this.#resolve(op, src, false);
    try {
      const rd = await this.#resolve(op, dst, false);
      try {
        this.#checkRemovable(op, src, rs.guest);
        this.#checkRemovable(op, dst, rd.guest);
        if (!rs.stats || !rs.final) throw fail("ENOENT", op, src, rs, "no such file or directory", "check the source path with exists() or readdir() of its parent");
        if (rs.guest === rd.guest) return;
        const target = await this.#finalEntry(op, dst, rd);
        try {
          await fs.rename(this.#pathOf(rs), at(target.dir, target.name));
        } catch (err) {
          if (errno(err) === "EINVAL") {
            throw new AgentVmError("EINVAL", `move ${label}: cannot move a directory into itself; choose a destination outside it`, { cause: err });
          }
          throw fsError(err, op, label);
        }
      } finally {
        await release(rd);
      }
    } finally {
      await release(rs);
    }
  }

  /** Where a guest path is on the host (for messages and tests; never acted on: a guest may change what it names). */
  async hostPath(file: string): Promise<string> {
    const op = "hostPath";
    const guest = normalise("path", file);
    const r = await this.#resolve(op, guest, true);
    await release(r);
    return this.#hostOf(await this.#rootPath(op, guest), r.parts);
  }

  async #stat(op: Op, file: string, follow: boolean): Promise<VmStat> {
    const guest = normalise("path", file);
    const r = await this.#resolve(op, guest, follow);
    await release(r);
    if (!r.stats) throw fail("ENOENT", op, guest, r, "no such file or directory", "check the path with exists() or readdir() of its parent");
    return toVmStat(r.stats);
  }

  async #rootPath(op: Op, guest: string): Promise<string> {
    if (this.#realRoot === undefined) {
      try {
        this.#realRoot = await fs.realpath(this.#root);
      } catch (err) {
        const code = errno(err);
        throw new AgentVmError(
          code === "ENOENT" ? "ENOENT" : "INTERNAL",
          `${op} ${guest}: the VM's root directory is missing or unreadable (${code ?? "unknown error"}); was the VM disposed?`,
          { cause: err },
        );
      }
    }
    return this.#realRoot;
  }

  /** The host target of a mount point exactly at these guest components, if one is there. */
  #mountAt(parts: readonly string[]): string | undefined {
    const guest = `/${parts.join("/")}`;
    return this.#mounts.find(([prefix]) => prefix === guest)?.[1];
  }

  /** The final component as a descriptor-relative path (its directory's descriptor, its name). */
  #pathOf(r: Resolved): string {
    return r.final ? at(r.final.dir, r.final.name) : at(r.dirs[0]!);
  }

  /**
   * Walks the path one component at a time, relative to open directories
   * (`/proc/self/fd/<dir>/<name>`, the openat of a language without openat):
   * each directory is opened with O_NOFOLLOW before the walk goes into it, so
   * a guest that swaps a directory for a symlink mid-walk makes the walk fail,
   * never lead out. Symlinks are interpreted against the VM root (absolute
   * targets restart at the VM's `/`, `..` stops at it); the image's
   * directories are walked from their host directories, as mounted. Missing
   * components are kept lexically so writers can create them. The caller
   * releases the directories with release().
   */
  async #resolve(op: Op, guest: string, followFinal: boolean): Promise<Resolved> {
    const rootPath = await this.#rootPath(op, guest);
    const opened: fs.FileHandle[] = [];
    const openDir = async (where: string) => {
      const handle = await fs.open(where, DIRECTORY);
      opened.push(handle);
      return handle;
    };
    try {
      const root = await openDir(rootPath);
      const pending = splitGuest(guest).reverse();
      const parts: string[] = [];
      // dirs[i] is the open directory that parts[0..i) names: dirs[0] the root.
      const dirs: fs.FileHandle[] = [root];
      const found: Stats[] = [await root.stat()];
      let last: { dir: fs.FileHandle; name: string } | undefined;
      let missing = false;
      let hops = 0;
      while (pending.length > 0) {
        const name = pending.pop() as string;
        if (name === "" || name === ".") continue;
        if (name === "..") {
          // The kernel would need the missing directory to exist to climb out of it.
          if (missing) throw fail("ENOENT", op, guest, undefined, "a symlink on the path climbs out of a directory that does not exist", "fix the symlink");
          if (parts.length > 0) {
            parts.pop();
            found.pop();
            dirs.length = parts.length + 1;
          }
          last = undefined;
          continue;
        }
        if (missing) {
          parts.push(name);
          continue;
        }
        const mount = this.#mountAt([...parts, name]);
        const dir = mount ? await openDir(path.dirname(mount)) : dirs[dirs.length - 1]!;
        const entry = mount ? path.basename(mount) : name;
        let st: Stats;
        try {
          st = await fs.lstat(at(dir, entry));
        } catch (err) {
          if (errno(err) === "ENOENT") {
            missing = true;
            parts.push(name);
            last = { dir, name: entry };
            continue;
          }
          throw fsError(err, op, guest);
        }
        if (st.isSymbolicLink() && (followFinal || pending.length > 0)) {
          if (++hops > MAX_SYMLINK_HOPS) {
            throw fail("ELOOP", op, guest, undefined, `more than ${MAX_SYMLINK_HOPS} symbolic links on the path`, "fix the symlink loop");
          }
          let target: string;
          try {
            target = await fs.readlink(at(dir, entry));
          } catch (err) {
            throw fsError(err, op, guest);
          }
          if (target === "") throw fail("ENOENT", op, guest, undefined, "a symlink on the path has an empty target", "fix or delete the symlink");
          if (target.startsWith("/")) {
            parts.length = 0;
            found.length = 1;
            dirs.length = 1;
          }
          pending.push(...target.split("/").reverse());
          last = undefined;
          continue;
        }
        parts.push(name);
        found.push(st);
        last = { dir, name: entry };
        if (pending.length > 0) {
          if (!st.isDirectory()) {
            const where = `/${parts.join("/")}`;
            throw fail("ENOTDIR", op, guest, undefined, `${where} is not a directory`, "fix the path, or move that file out of the way");
          }
          try {
            dirs.push(await openDir(at(dir, entry)));
          } catch (err) {
            // Swapped for a symlink or a file since the lstat above: the guest is racing us.
            throw fsError(err, op, guest);
          }
        }
      }
      const existing = found.length - 1;
      return {
        guest: `/${parts.join("/")}`,
        parts,
        existing,
        stats: missing ? null : (found[found.length - 1] as Stats),
        dirs,
        // Known only when the final component's directory exists (and for "/", which has none).
        final: parts.length > 0 && existing >= parts.length - 1 ? last : undefined,
        opened,
      };
    } catch (err) {
      await Promise.all(opened.map((handle) => handle.close().catch(() => {})));
      throw err;
    }
  }

  /**
   * The final component's directory and name, making missing directories
   * above it first (mkdir -p, one level at a time, each made relative to the
   * one above and opened before going on).
   */
  async #finalEntry(op: Op, guest: string, r: Resolved): Promise<{ dir: fs.FileHandle; name: string }> {
    if (r.final) return r.final;
    if (r.parts.length === 0) throw fail("EISDIR", op, guest, r, "is the VM's root directory", "name a path inside it");
    this.#checkWritable(op, guest, r.guest);
    let dir = r.dirs[r.dirs.length - 1]!;
    for (let i = r.dirs.length - 1; i < r.parts.length - 1; i++) {
      const name = r.parts[i]!;
      try {
        await fs.mkdir(at(dir, name));
        await this.#own(at(dir, name));
      } catch (err) {
        if (errno(err) !== "EEXIST") throw fsError(err, op, guest);
      }
      try {
        dir = await fs.open(at(dir, name), DIRECTORY);
      } catch (err) {
        if (errno(err) === "ENOTDIR" || errno(err) === "ELOOP") {
          throw fail("ENOTDIR", op, guest, undefined, `/${r.parts.slice(0, i + 1).join("/")} is not a directory`, "fix the path, or move that file out of the way");
        }
        throw fsError(err, op, guest);
      }
      r.opened.push(dir);
      r.dirs.push(dir);
    }
    r.final = { dir, name: r.parts[r.parts.length - 1]! };
    return r.final;
  }

  /** What the server just made becomes the guests' (lchown: never through a link). */
  async #own(where: string): Promise<void> {
    if (this.#owner) await fs.lchown(where, this.#owner.uid, this.#owner.gid);
  }

  #isReadOnly(guest: string): string | undefined {
    return this.#readOnly.find((ro) => ro === "/" || guest === ro || guest.startsWith(`${ro}/`));
  }

  #checkWritable(op: Op, guest: string, resolved: string = guest): void {
    const ro = this.#isReadOnly(resolved);
    if (ro !== undefined) throw readOnlyError(op, guest, resolved, ro);
  }

  /** Deleting or moving also must not take a read-only mount point or the home with it. */
  #checkRemovable(op: Op, guest: string, resolved: string = guest): void {
    const home = VmFilesystem.HOME;
    if (resolved === "/" || resolved === home || home.startsWith(`${resolved}/`)) {
      const via = resolved === guest ? "" : ` (it resolves to ${resolved})`;
      throw new AgentVmError(
        "EPERM",
        `${op} ${guest}: refusing to ${op === "move" ? "move" : "delete"} the VM's root or home directory${via}; operate on the entries inside it instead`,
      );
    }
    this.#checkWritable(op, guest, resolved);
    const inside = this.#readOnly.find((ro) => ro.startsWith(`${resolved}/`));
    if (inside !== undefined) throw readOnlyError(op, guest, resolved, inside);
  }
}

/** Guest paths resolve the way the VM sees them: relative to the home, `..` clamped at `/`. */
export function normaliseGuestPath(name: string, value: unknown): string {
  return normalise(name, value);
}

function normalise(name: string, value: unknown): string {
  const raw = expectString(name, value, { nonEmpty: true, max: MAX_PATH });
  // posix.normalize clamps `..` at `/` for absolute paths, as a chroot does.
  const norm = path.posix.normalize(raw.startsWith("/") ? raw : `${VmFilesystem.HOME}/${raw}`);
  return norm.length > 1 && norm.endsWith("/") ? norm.slice(0, -1) : norm;
}

function splitGuest(guest: string): string[] {
  return guest.split("/").filter((part) => part !== "");
}

/** A FileWriter over `handle`: commit or abort runs once, whichever comes first; errors are shaped like every fs error. */
function fileWriter(handle: fs.FileHandle, op: Op, guest: string, r: Resolved, end: { commit(): Promise<void>; abort(): Promise<void> }): FileWriter {
  let settled = false;
  return {
    handle,
    write: (data) => writeAll(handle, data, op, guest, r),
    async commit() {
      if (settled) throw new AgentVmError("INTERNAL", `${op} ${guest}: the write was already committed or aborted`);
      settled = true;
      try {
        await end.commit();
      } catch (err) {
        throw fsError(err, op, guest, r);
      }
    },
    async abort() {
      if (settled) return;
      settled = true;
      await end.abort();
    },
  };
}

async function writeAll(handle: fs.FileHandle, data: Uint8Array, op: Op, guest: string, r: Resolved): Promise<void> {
  try {
    for (let offset = 0; offset < data.byteLength; ) {
      const { bytesWritten } = await handle.write(data, offset, data.byteLength - offset);
      offset += bytesWritten;
    }
  } catch (err) {
    throw fsError(err, op, guest, r);
  }
}

function readMode(name: string, value: unknown): number {
  if (typeof value !== "number" || !Number.isInteger(value) || value < 0 || value > MAX_WRITE_MODE) {
    throw invalidArgument(`${name} must be permission bits from 0 to 0o777 (e.g. 0o644 or 0o755; setuid, setgid and sticky are not allowed), got ${describe(value)}`);
  }
  return value;
}

function readWithin(options: unknown): string | undefined {
  if (options === undefined) return undefined;
  const within = (expectObject("options", options) as ConfineOptions).within;
  return within === undefined ? undefined : normalise("options.within", within);
}

function readWriteOptions(options: unknown): { mode: number | undefined; append: boolean; within: string | undefined } {
  if (options === undefined) return { mode: undefined, append: false, within: undefined };
  const opts = expectObject("options", options);
  expectKnownKeys("options", opts, ["mode", "append", "within"]);
  if (opts.append !== undefined && typeof opts.append !== "boolean") throw invalidArgument(`options.append must be a boolean, got ${describe(opts.append)}`);
  return { mode: opts.mode === undefined ? undefined : readMode("options.mode", opts.mode), append: opts.append === true, within: readWithin(options) };
}

/** Tar extraction: refuses a path that resolves (through `..` or a symlink) outside the target directory. */
function checkWithin(op: Op, guest: string, r: Resolved, within: string | undefined): void {
  if (within === undefined || r.guest === within || r.guest.startsWith(within === "/" ? "/" : `${within}/`)) return;
  throw new AgentVmError("PATH_OUTSIDE_VM", `${op} ${subject(guest, r)}: leads outside ${within}, the directory being extracted into; the archive entry was refused`);
}

function readRecursive(options: unknown): boolean {
  if (options === undefined) return false;
  const opts = expectObject("options", options);
  expectKnownKeys("options", opts, ["recursive"]);
  const value = opts.recursive;
  if (value === undefined) return false;
  if (typeof value !== "boolean") throw invalidArgument(`options.recursive must be a boolean, got ${describe(value)}`);
  return value;
}

function toVmStat(st: Stats): VmStat {
  const type = st.isFile() ? "file" : st.isDirectory() ? "directory" : st.isSymbolicLink() ? "symlink" : "other";
  return {
    type,
    size: st.size,
    mode: st.mode,
    mtimeMs: st.mtimeMs,
    ctimeMs: st.ctimeMs,
    isFile: type === "file",
    isDirectory: type === "directory",
    isSymbolicLink: type === "symlink",
  };
}

function errno(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === "string" ? code : undefined;
}

function subject(guest: string, r?: Resolved): string {
  return r && r.guest !== guest ? `${guest} (resolved through symlinks to ${r.guest})` : guest;
}

function fail(code: ErrorCode, op: Op, guest: string, r: Resolved | undefined, what: string, hint: string): AgentVmError {
  return new AgentVmError(code, `${op} ${subject(guest, r)}: ${what}; ${hint}`);
}

function hardLink(op: Op, guest: string, r?: Resolved): AgentVmError {
  return fail(
    "EPERM",
    op,
    guest,
    r,
    "is a hard link (link count > 1), and hard links are refused by host-side file access because they may alias a file outside the VM",
    "copy the file's content to a new file inside the VM instead",
  );
}

function readOnlyError(op: Op, guest: string, resolved: string, ro: string): AgentVmError {
  const via = resolved === guest ? "" : ` (it resolves to ${resolved})`;
  return new AgentVmError(
    "EROFS",
    `${op} ${guest}${via}: ${ro} is one of the VM's read-only system directories, mounted read-only in the sandbox; write under ${VmFilesystem.HOME} or /tmp instead`,
  );
}

const HINTS: Partial<Record<string, [what: string, hint: string]>> = {
  ENOENT: ["no such file or directory", "check the path with exists() or readdir() of its parent"],
  EEXIST: ["already exists", "choose another name or delete it first"],
  ENOTDIR: ["a component of the path is not a directory", "fix the path"],
  EISDIR: ["is a directory", "use a file path, or deleteFile with { recursive: true } to remove the directory"],
  ENOTEMPTY: ["directory is not empty", "delete its contents first, or use deleteFile with { recursive: true }"],
  EACCES: ["permission denied on the host", "check the mode of the file and its parent directories inside the VM"],
  EPERM: ["operation not permitted on the host", "check the mode and flags of the file inside the VM"],
  ELOOP: ["is a symbolic link where a file was expected (it changed while being opened)", "retry, or fix the symlink"],
  EINVAL: ["invalid operation for this file", "check the path and the kind of file it names"],
  EMFILE: ["too many open files on the host", "retry later"],
  EROFS: ["the host filesystem is read-only", "the VM's disk cannot be written at the moment"],
  EAGAIN: ["resource temporarily unavailable", "retry"],
};

/**
 * A directory of the VM held open (VmFilesystem.openDirectory). Every name is one
 * entry of it (no "/"), acted on as `/proc/self/fd/<dir>/<name>` with O_NOFOLLOW:
 * an entry the guest swaps for a symlink fails (ELOOP) instead of being followed.
 * A mount point (the image's directories) is reached through the path resolver,
 * which knows where it is mounted from.
 */
export class VmDirectory {
  readonly guest: string;
  readonly #files: VmFilesystem;
  readonly #handle: fs.FileHandle;
  readonly #isMountPoint: (guest: string) => boolean;

  constructor(files: VmFilesystem, handle: fs.FileHandle, guest: string, isMountPoint: (guest: string) => boolean) {
    this.#files = files;
    this.#handle = handle;
    this.guest = guest;
    this.#isMountPoint = isMountPoint;
  }

  /** The guest path of an entry. */
  child(name: string): string {
    return this.guest === "/" ? `/${name}` : `${this.guest}/${name}`;
  }

  /** The entries' names, sorted, without writes in flight (as readdir). */
  async entries(): Promise<string[]> {
    try {
      return (await fs.readdir(at(this.#handle))).filter((name) => !TEMP_FILE_PATTERN.test(name)).sort();
    } catch (err) {
      throw fsError(err, "readdir", this.guest);
    }
  }

  async lstat(name: string): Promise<VmStat> {
    const guest = this.#entry(name);
    if (this.#isMountPoint(guest)) return this.#files.lstat(guest);
    try {
      return toVmStat(await fs.lstat(at(this.#handle, name)));
    } catch (err) {
      throw fsError(err, "lstat", guest);
    }
  }

  async readlink(name: string): Promise<string> {
    const guest = this.#entry(name);
    if (this.#isMountPoint(guest)) return this.#files.readlink(guest);
    try {
      return await fs.readlink(at(this.#handle, name));
    } catch (err) {
      throw fsError(err, "readlink", guest);
    }
  }

  /** A regular file of this directory, opened for reading, with the checks openRead makes. */
  async openFile(name: string): Promise<OpenedFile> {
    const op = "readFile";
    const guest = this.#entry(name);
    if (this.#isMountPoint(guest)) return this.#files.openRead(guest);
    let handle: fs.FileHandle;
    try {
      handle = await fs.open(at(this.#handle, name), constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
    } catch (err) {
      throw fsError(err, op, guest);
    }
    try {
      const st = await handle.stat();
      if (st.isDirectory()) throw fail("EISDIR", op, guest, undefined, "is a directory", "use readdir to list it");
      if (!st.isFile()) throw fail("EINVAL", op, guest, undefined, "is not a regular file (a FIFO, socket or device)", "only regular files can be read from the host");
      if (st.nlink > 1) throw hardLink(op, guest);
      return { handle, size: st.size, mode: st.mode & 0o7777 };
    } catch (err) {
      await handle.close();
      throw fsError(err, op, guest);
    }
  }

  /** A subdirectory, held open in turn; the caller closes it. */
  async openDirectory(name: string): Promise<VmDirectory> {
    const guest = this.#entry(name);
    if (this.#isMountPoint(guest)) return this.#files.openDirectory(guest);
    try {
      return new VmDirectory(this.#files, await fs.open(at(this.#handle, name), DIRECTORY), guest, this.#isMountPoint);
    } catch (err) {
      throw fsError(err, "readdir", guest);
    }
  }

  async close(): Promise<void> {
    await this.#handle.close();
  }

  /** Names come from entries(); anything else (a path, "..") is refused rather than walked. */
  #entry(name: string): string {
    if (name === "" || name === "." || name === ".." || name.includes("/") || name.includes("\0")) {
      throw invalidArgument(`${JSON.stringify(name)} is not an entry name of ${this.guest}`);
    }
    return this.child(name);
  }
}

/** Maps a Node fs error to the same POSIX code, never letting its host path through. */
function fsError(err: unknown, op: Op, guest: string, r?: Resolved): AgentVmError {
  if (err instanceof AgentVmError) return err;
  const code = errno(err);
  if (code === "ENAMETOOLONG") {
    return new AgentVmError("INVALID_ARGUMENT", `${op} ${subject(guest, r)}: a path component is longer than the host allows (255 bytes); use a shorter name`, { cause: err });
  }
  if (code === "ENOSPC" || code === "EDQUOT") {
    return new AgentVmError("VM_DISK_FULL", `${op} ${subject(guest, r)}: the VM's disk is full (limits.diskBytes or limits.diskInodes); delete files in the VM, or give it larger limits`, { cause: err });
  }
  if (code === "ENXIO" || code === "ENODEV") {
    return new AgentVmError("EINVAL", `${op} ${subject(guest, r)}: is not a regular file (a socket or device); only regular files can be read from the host`, { cause: err });
  }
  const known = code !== undefined && POSIX.has(code) ? (code as ErrorCode) : undefined;
  const [what, hint] = (code && HINTS[code]) ?? [`host filesystem error ${code ?? "(unknown)"}`, "check the VM's disk on the host"];
  return new AgentVmError(known ?? "INTERNAL", `${op} ${subject(guest, r)}: ${what}; ${hint}`, { cause: err });
}
