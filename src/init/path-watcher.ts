/**
 * Watches inside the VM: inotify through Node's fs.watch, on guest paths (init
 * runs in the VM's mount namespace, so every path it reports is the guest's).
 *
 * fs.watch only says "rename" or "change" for a name, so events are classified
 * when a batch is flushed, from what the path is now and what it was: a path
 * that appeared is a create, one that vanished a delete, one that vanished and
 * reappeared elsewhere with the same inode a rename. Events for the same path
 * within COALESCE_MS collapse into one; a burst beyond MAX_PENDING paths is
 * reported as one "overflow" event (then the client should re-read the tree).
 */
import { lstatSync, readdirSync, statSync, watch, type FSWatcher } from "node:fs";
import { join } from "node:path";
import { MAX_WATCH_BATCH, type WatchEvent } from "./protocol.ts";

export const COALESCE_MS = 50;
/** Paths remembered per watch (for create/modify and rename detection); beyond it, events still flow, only coarser. */
const MAX_KNOWN = 20_000;
/** Longest path an event may carry (the control channel's limit for text). */
const MAX_EVENT_PATH = 4096;

export interface PathWatcherEvents {
  events(batch: WatchEvent[]): void;
  /** The watch ended on its own (its path was deleted, or inotify failed). */
  ended(code: string, message: string): void;
}

export class PathWatcher {
  readonly #root: string;
  readonly #recursive: boolean;
  readonly #sink: PathWatcherEvents;
  readonly #watcher: FSWatcher;
  /** path → inode of what was there when last seen. */
  readonly #known = new Map<string, number>();
  readonly #pending = new Set<string>();
  #overflow = false;
  #timer: NodeJS.Timeout | undefined;
  #closed = false;

  /** Throws (ENOENT, ENOTDIR, …) when the path cannot be watched. */
  constructor(root: string, recursive: boolean, sink: PathWatcherEvents) {
    this.#root = root;
    this.#recursive = recursive;
    this.#sink = sink;
    const rootIsDir = statSync(root).isDirectory();
    this.#scan(rootIsDir);
    this.#watcher = watch(root, { recursive: recursive && rootIsDir, persistent: false }, (_type, filename) => {
      this.#touch(rootIsDir && filename ? join(root, filename.toString()) : root);
    });
    this.#watcher.on("error", (error: NodeJS.ErrnoException) => this.#end(error.code ?? "EIO", `the watch on ${root} failed: ${error.message}`));
  }

  close(): void {
    this.#closed = true;
    clearTimeout(this.#timer);
    this.#watcher.close();
  }

  #touch(path: string): void {
    if (this.#closed) return;
    if (this.#pending.size >= MAX_WATCH_BATCH - 1 && !this.#pending.has(path)) this.#overflow = true;
    else this.#pending.add(path);
    this.#timer ??= setTimeout(() => this.#flush(), COALESCE_MS);
  }

  #flush(): void {
    this.#timer = undefined;
    if (this.#closed) return;
    const appeared: [string, number][] = [];
    const vanished: string[] = [];
    const events: WatchEvent[] = [];
    for (const path of this.#pending) {
      const now = lstatSync(path, { throwIfNoEntry: false });
      const before = this.#known.get(path);
      if (now && before === now.ino) events.push({ type: "modify", path });
      else if (now) appeared.push([path, now.ino]);
      else if (before !== undefined) vanished.push(path);
      // Neither before nor now: created and deleted within one batch, nothing to tell.
    }
    this.#pending.clear();
    for (const [path, ino] of appeared) {
      const from = vanished.findIndex((old) => this.#known.get(old) === ino);
      if (from !== -1) {
        const [oldPath] = vanished.splice(from, 1) as [string];
        this.#known.delete(oldPath);
        events.push({ type: "rename", path, oldPath });
      } else events.push({ type: this.#known.has(path) ? "modify" : "create", path });
      this.#remember(path, ino);
    }
    for (const path of vanished) {
      this.#known.delete(path);
      events.push({ type: "delete", path });
    }
    if (this.#overflow) {
      this.#overflow = false;
      events.push({ type: "overflow", path: this.#root });
      this.#known.clear();
      const root = statSync(this.#root, { throwIfNoEntry: false });
      if (root) this.#scan(root.isDirectory());
    }
    // The server refuses longer paths (as a protocol violation); a guest can nest directories deeper than that.
    const sendable = events.filter((event) => event.path.length <= MAX_EVENT_PATH && (event.oldPath ?? "").length <= MAX_EVENT_PATH);
    if (sendable.length < events.length && !sendable.some((event) => event.type === "overflow")) sendable.push({ type: "overflow", path: this.#root });
    if (sendable.length > 0) this.#sink.events(sendable);
    if (!statSync(this.#root, { throwIfNoEntry: false })) this.#end("ENOENT", `the watched path ${this.#root} was deleted`);
  }

  #remember(path: string, ino: number): void {
    if (this.#known.size < MAX_KNOWN || this.#known.has(path)) this.#known.set(path, ino);
  }

  /** What is there now, so the first events can tell a create from a modify. */
  #scan(rootIsDir: boolean): void {
    const queue = [this.#root];
    for (let dir = queue.shift(); dir !== undefined && this.#known.size < MAX_KNOWN; dir = queue.shift()) {
      const st = lstatSync(dir, { throwIfNoEntry: false });
      if (!st) continue;
      this.#remember(dir, st.ino);
      if (!rootIsDir || !st.isDirectory() || (dir !== this.#root && !this.#recursive)) continue;
      let names: string[];
      try {
        names = readdirSync(dir);
      } catch {
        continue;
      }
      for (const name of names) queue.push(join(dir, name));
    }
  }

  #end(code: string, message: string): void {
    if (this.#closed) return;
    this.close();
    this.#sink.ended(code, message);
  }
}
