/**
 * A VM actor: one key's VM on the server, awake while it is used and asleep
 * otherwise. Awake means a live `Vm` (its sandbox and processes); asleep means
 * only its directory and its SQLite rows exist.
 *
 * It stays awake while any of these hold: a request or stream is in flight, a
 * client connection (event stream) is open — each takes a `hold()` — or a
 * guest process runs. Once none has
 * held for `sleepAfterMs`, it sleeps. Any action wakes it; concurrent wakes
 * share one.
 *
 * `destroy()` ends it for good, in an order that a failure can resume: mark the
 * row `destroying` (no wake from then on), revoke its preview tokens, end its
 * processes, remove its directory, delete its row. Until the row is gone a wake
 * is refused with VM_DESTROY_FAILED; the next destroy picks up where the last
 * one stopped. Once it is gone, the key starts a fresh, empty VM.
 */
import { access } from "node:fs/promises";
import { join } from "node:path";
import { AgentVmError } from "../errors.ts";
import { createVm, vmDirectoryName, type ProcessExitEvent, type ProcessOutputEvent, type Vm } from "../vm.ts";
import type { SqliteStore } from "../store/sqlite-store.ts";
import type { PreviewStore } from "../store/preview-store.ts";
import { PreviewTokens } from "../net/previews.ts";
import type { VmDefinition } from "./definition.ts";
import { removeTree } from "./remove-tree.ts";

export interface VmEventListener {
  processOutput(event: ProcessOutputEvent): void;
  processExit(event: ProcessExitEvent): void;
  /** The VM was destroyed: no more events will come. */
  destroyed(): void;
}

/** One VM in a listing: its SQLite row plus whether it is awake now. Times in epoch ms. */
export interface VmSummary {
  key: string;
  awake: boolean;
  createdAt: number;
  lastActiveAt: number;
  wakeCount: number;
  /** Present when a destroy started and did not finish: destroy it again. */
  destroying?: true;
}

/** What a destroy found: whether there was anything (a row or files) to remove. */
export interface DestroyResult {
  key: string;
  existed: boolean;
}

/** SQLite's last_active_at is advisory: write it at most this often per VM. */
const TOUCH_EVERY_MS = 1000;

export class VmActor {
  readonly definitionName: string;
  readonly key: string;
  readonly #definition: VmDefinition;
  readonly #dataDir: string;
  readonly #store: SqliteStore;
  readonly #listeners = new Set<VmEventListener>();
  #vm: Vm | undefined;
  #waking: Promise<Vm> | undefined;
  #destroying: Promise<DestroyResult> | undefined;
  #holds = 0;
  #sleepTimer: NodeJS.Timeout | undefined;
  #lastTouch = 0;
  #closed = false;
  /** Resolved on the next sleep (a cluster runner keeps its actor awake until then). */
  #asleep: PromiseWithResolvers<void> | undefined;

  readonly #previews: PreviewStore;
  /** Where the server's preview listener answers; preview `url`s are built on it. */
  readonly #previewOrigin: string;

  /** A cluster node's name, carried in its preview tokens. */
  readonly #previewOwner: string | undefined;

  constructor(init: { definitionName: string; key: string; definition: VmDefinition; dataDir: string; store: SqliteStore; previews: PreviewStore; previewOrigin: string; previewOwner?: string }) {
    this.#previews = init.previews;
    this.#previewOwner = init.previewOwner;
    this.#previewOrigin = init.previewOrigin;
    this.definitionName = init.definitionName;
    this.key = init.key;
    this.#definition = init.definition;
    this.#dataDir = init.dataDir;
    this.#store = init.store;
  }

  get awake(): boolean {
    return this.#vm !== undefined;
  }

  /** For operators: the actor's state, read without waking it. */
  status(): { awake: boolean; runningProcesses: number; createdAt: number | null; lastActiveAt: number | null; wakeCount: number } {
    const record = this.#store.getVm(this.definitionName, this.key);
    return {
      awake: this.awake,
      runningProcesses: this.#vm ? this.#vm.runningProcessCount() : 0,
      createdAt: record?.createdAt ?? null,
      lastActiveAt: record?.lastActiveAt ?? null,
      wakeCount: record?.wakeCount ?? 0,
    };
  }

  /** Runs `work` against the awake VM, keeping it awake until the work settles. */
  async use<T>(work: (vm: Vm) => Promise<T> | T): Promise<T> {
    const release = this.hold();
    try {
      return await work(await this.wake());
    } finally {
      release();
    }
  }

  /** Keeps the VM awake until the returned function is called (streams, connections). */
  hold(): () => void {
    this.#holds++;
    this.#cancelSleep();
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.#holds--;
      this.#scheduleSleep();
    };
  }

  subscribe(listener: VmEventListener): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  wake(): Promise<Vm> {
    if (this.#closed) return Promise.reject(new AgentVmError("SERVER_CLOSING", `VM ${this.key}: the server is shutting down`));
    // A wake during a destroy waits for it: then the row is gone (a fresh VM) or marked (refused).
    if (this.#destroying) return this.#destroying.then(() => this.wake(), () => this.wake());
    this.#touch();
    if (this.#vm) return Promise.resolve(this.#vm);
    this.#waking ??= this.#create().finally(() => (this.#waking = undefined));
    return this.#waking;
  }

  /** Stops the VM's processes and frees it; files and SQLite rows stay. */
  async sleep(): Promise<void> {
    this.#cancelSleep();
    const vm = this.#vm;
    this.#vm = undefined;
    await vm?.dispose();
    const asleep = this.#asleep;
    this.#asleep = undefined;
    asleep?.resolve();
  }

  /** Settles when the VM next goes to sleep (at once when it is asleep). */
  whenAsleep(): Promise<void> {
    if (!this.#vm && !this.#waking) return Promise.resolve();
    this.#asleep ??= Promise.withResolvers<void>();
    return this.#asleep.promise;
  }

  async close(): Promise<void> {
    this.#closed = true;
    await this.#destroying?.catch(() => undefined);
    await this.#waking?.catch(() => undefined);
    await this.sleep();
  }

  /** Ends the VM for good (see the file header); concurrent destroys share one. */
  destroy(): Promise<DestroyResult> {
    this.#destroying ??= this.#destroy().finally(() => (this.#destroying = undefined));
    return this.#destroying;
  }

  async #destroy(): Promise<DestroyResult> {
    // A wake already under way finishes first, so its VM is the one disposed below.
    await this.#waking?.catch(() => undefined);
    const record = this.#store.getVm(this.definitionName, this.key);
    if (record) this.#store.markDestroying(this.definitionName, this.key);
    const directory = join(this.#dataDir, "vms", record?.directory ?? vmDirectoryName(this.key));
    this.#previews.deleteAll(this.definitionName, this.key);
    for (const listener of [...this.#listeners]) listener.destroyed();
    this.#listeners.clear();
    await this.sleep();
    const existed = record !== undefined || (await pathExists(directory));
    try {
      await removeTree(directory);
    } catch (error) {
      throw new AgentVmError(
        "VM_DESTROY_FAILED",
        `destroying VM ${JSON.stringify(this.key)} (${this.definitionName}): its processes were ended and its preview URLs revoked, but removing ${directory} failed (${(error as Error).message}); destroy it again to finish`,
        { cause: error },
      );
    }
    this.#store.deleteVm(this.definitionName, this.key);
    this.#lastTouch = 0;
    return { key: this.key, existed };
  }

  async #create(): Promise<Vm> {
    const record = this.#store.getVm(this.definitionName, this.key);
    if (record?.destroying) {
      throw new AgentVmError("VM_DESTROY_FAILED", `VM ${JSON.stringify(this.key)} (${this.definitionName}) is half destroyed (a destroy failed or was interrupted); destroy it again to finish, then the key starts a fresh VM`);
    }
    if (!record) this.#store.ensureVm(this.definitionName, this.key, vmDirectoryName(this.key));
    else this.#store.recordWake(this.definitionName, this.key);
    const vm = await createVm(
      {
        dataDir: this.#dataDir,
        name: this.key,
        software: [...this.#definition.software],
        ...(this.#definition.permissions ? { permissions: this.#definition.permissions } : {}),
        ...(this.#definition.listenConfig ? { listen: this.#definition.listenConfig } : {}),
        ...(this.#definition.limits ? { limits: this.#definition.limits } : {}),
        ...(this.#definition.hosts ? { hosts: this.#definition.hosts } : {}),
      },
      { previews: new PreviewTokens(this.#previews, this.#definition.preview, { definition: this.definitionName, key: this.key, origin: this.#previewOrigin, ...(this.#previewOwner !== undefined ? { owner: this.#previewOwner } : {}) }) },
    );
    vm.on("processOutput", (event) => {
      for (const listener of this.#listeners) listener.processOutput(event);
    });
    vm.on("processExit", (event) => {
      for (const listener of this.#listeners) listener.processExit(event);
      this.#scheduleSleep();
    });
    this.#vm = vm;
    this.#scheduleSleep();
    return vm;
  }

  #touch(): void {
    const now = Date.now();
    if (now - this.#lastTouch < TOUCH_EVERY_MS) return;
    this.#lastTouch = now;
    if (this.#vm) this.#store.touchVm(this.definitionName, this.key);
  }

  #scheduleSleep(): void {
    this.#cancelSleep();
    const vm = this.#vm;
    if (!vm || this.#holds > 0 || this.#closed) return;
    if (vm.runningProcessCount() > 0) return;
    this.#sleepTimer = setTimeout(() => {
      this.#sleepTimer = undefined;
      // Re-check: a process may have started since the timer was set.
      if (this.#holds === 0 && !this.#vm?.runningProcessCount()) {
        void this.sleep();
      }
    }, this.#definition.sleepAfterMs);
    this.#sleepTimer.unref();
  }

  #cancelSleep(): void {
    if (this.#sleepTimer) clearTimeout(this.#sleepTimer);
    this.#sleepTimer = undefined;
  }
}

async function pathExists(path: string): Promise<boolean> {
  return access(path).then(
    () => true,
    () => false,
  );
}
