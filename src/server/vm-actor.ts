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
import { access, lstat, readdir } from "node:fs/promises";
import { join } from "node:path";
import { AgentVmError } from "../errors.ts";
import { log } from "../log.ts";
import { createVm, vmDirectoryName, type ProcessExitEvent, type ProcessOutputEvent, type Vm, type VmLifecycle } from "../vm.ts";
import type { SqliteStore } from "../store/sqlite-store.ts";
import type { PreviewStore } from "../store/preview-store.ts";
import { PreviewTokens } from "../net/previews.ts";
import { captureVmState, type DurableCopy } from "../store/vm-durable-state.ts";
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
  /** Bytes its directory took on disk when it last went to sleep; null before its first sleep. */
  diskBytes: number | null;
  /** Present when a destroy started and did not finish: destroy it again. */
  destroying?: true;
}

/** What a destroy found: whether there was anything (a row or files) to remove. */
export interface DestroyResult {
  key: string;
  existed: boolean;
}

/** What GET …/status answers. Times in epoch ms; null for a VM that was never created. */
export interface VmStatus {
  awake: boolean;
  runningProcesses: number;
  createdAt: number | null;
  lastActiveAt: number | null;
  wakeCount: number;
}

/** The status of a VM that has no actor: asleep, or never created. */
export function asleepStatus(store: SqliteStore, definitionName: string, key: string): VmStatus {
  const record = store.getVm(definitionName, key);
  return { awake: false, runningProcesses: 0, createdAt: record?.createdAt ?? null, lastActiveAt: record?.lastActiveAt ?? null, wakeCount: record?.wakeCount ?? 0 };
}

/** How long after a wake requests wait for restarted processes' ports (see #startOnWake). */
const RESTART_GRACE_MS = 15_000;

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
  /** When the VM last woke (epoch ms). */
  #wokeAt = 0;
  /** The idle timeout in force while awake (read as it wakes and on setLifecycle). */
  #idleTimeoutSeconds: number | null = null;
  #sleepTimer: NodeJS.Timeout | undefined;
  #lastTouch = 0;
  #closed = false;
  /** Resolved on the next sleep (a cluster runner keeps its actor awake until then). */
  #asleep: PromiseWithResolvers<void> | undefined;

  readonly #previews: PreviewStore;
  /** Builds a preview token's `url` (the server's preview origin, or its public URL). */
  readonly #previewUrl: (token: string) => string;
  /** Told when the actor holds nothing (asleep, unused): the registry then forgets it. */
  readonly #onIdle: ((actor: VmActor) => void) | undefined;
  readonly #maxVms: number;

  /** A cluster node's name, carried in its preview tokens. */
  readonly #previewOwner: string | undefined;
  /** Where a cluster node keeps the VM's rows beyond its disk; undefined on a single server. */
  readonly #durableCopy: DurableCopy | undefined;
  /** The store's change count (SqliteStore.vmChangeCount) of the state last saved to #durableCopy, and the save in progress: saves run one at a time, so the last one holds the newest state. */
  #savedChanges = -1;
  #saving: Promise<void> = Promise.resolve();

  constructor(init: {
    definitionName: string;
    key: string;
    definition: VmDefinition;
    dataDir: string;
    store: SqliteStore;
    previews: PreviewStore;
    previewUrl: (token: string) => string;
    onIdle?: (actor: VmActor) => void;
    /** VMs the definition may have; a new key past it is TOO_MANY_VMS. */
    maxVms?: number;
    /** A cluster node's name, carried in its preview tokens. */
    previewOwner?: string;
    durableCopy?: DurableCopy;
  }) {
    this.#durableCopy = init.durableCopy;
    this.#previewOwner = init.previewOwner;
    this.#maxVms = init.maxVms ?? Number.POSITIVE_INFINITY;
    this.#onIdle = init.onIdle;
    this.#previews = init.previews;
    this.#previewUrl = init.previewUrl;
    this.definitionName = init.definitionName;
    this.key = init.key;
    this.#definition = init.definition;
    this.#dataDir = init.dataDir;
    this.#store = init.store;
  }

  get awake(): boolean {
    return this.#vm !== undefined;
  }

  /** True while a request, stream or connection holds the VM (hold()). */
  get inUse(): boolean {
    return this.#holds > 0;
  }

  /** For operators: the actor's state, read without waking it. */
  status(): VmStatus {
    return { ...asleepStatus(this.#store, this.definitionName, this.key), awake: this.awake, runningProcesses: this.#vm ? this.#vm.runningProcessCount() : 0 };
  }

  /**
   * Runs `work` against the awake VM, keeping it awake until the work settles.
   * On a cluster node, a change the work made to the VM's durable state is saved
   * before this returns (a failed save fails the call, though the change is in
   * effect here); an older change whose save had failed is saved again, without
   * holding this call up.
   */
  async use<T>(work: (vm: Vm) => Promise<T> | T): Promise<T> {
    const release = this.hold();
    const before = this.#store.vmChangeCount(this.definitionName, this.key);
    try {
      return await work(await this.wake());
    } finally {
      try {
        if (this.#durableCopy && this.#store.vmChangeCount(this.definitionName, this.key) !== before) await this.#saveDurableState();
        else if (this.#durableCopy && this.#savedChanges !== before) this.#saveDurableState().catch(() => undefined);
      } finally {
        release();
      }
    }
  }

  /** Saves the VM's durable state to the cluster's copy when it changed since the last save. */
  #saveDurableState(): Promise<void> {
    const copy = this.#durableCopy;
    if (!copy) return Promise.resolve();
    const save = this.#saving.catch(() => undefined).then(async () => {
      const changes = this.#store.vmChangeCount(this.definitionName, this.key);
      if (changes === this.#savedChanges) return;
      const state = captureVmState(this.#store, this.#previews, this.definitionName, this.key);
      try {
        await copy.saveVm(this.definitionName, this.key, state);
      } catch (error) {
        log("warn", `the VM's state was not saved to the engine (${(error as Error).message}); it is tried again with the next call`, { definition: this.definitionName, key: this.key });
        throw error;
      }
      this.#savedChanges = changes;
    });
    this.#saving = save;
    return save;
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
      this.#checkIdle();
    };
  }

  subscribe(listener: VmEventListener): () => void {
    this.#listeners.add(listener);
    return () => {
      this.#listeners.delete(listener);
      this.#checkIdle();
    };
  }

  /** True when nothing refers to this actor's state: it may be dropped and made anew on next use. */
  get idle(): boolean {
    return !this.#vm && !this.#waking && !this.#destroying && this.#holds === 0 && this.#listeners.size === 0;
  }

  #checkIdle(): void {
    if (this.idle && !this.#closed) this.#onIdle?.(this);
  }

  wake(): Promise<Vm> {
    if (this.#closed) return Promise.reject(new AgentVmError("SERVER_CLOSING", `VM ${this.key}: the server is shutting down`));
    // A wake during a destroy waits for it: then the row is gone (a fresh VM) or marked (refused).
    if (this.#destroying) return this.#destroying.then(() => this.wake(), () => this.wake());
    this.#touch();
    if (this.#vm) return Promise.resolve(this.#vm);
    if (!this.#waking && this.#pastLifetime()) {
      // Its time is up: it goes for good, and this use gets a fresh VM.
      log("warn", `VM ${JSON.stringify(this.key)} reached its maxLifetimeSeconds; destroying it`, { definition: this.definitionName, key: this.key });
      return this.destroy().then(() => this.wake());
    }
    this.#waking ??= this.#create().finally(() => {
      this.#waking = undefined;
      this.#checkIdle();
    });
    return this.#waking;
  }

  /** The bounds in force: the VM's own (setLifecycle), else its definition's. */
  #lifecycle(record = this.#store.getVm(this.definitionName, this.key)): VmLifecycle {
    const maxLifetimeSeconds = record?.maxLifetimeSeconds ?? this.#definition.lifecycle.maxLifetimeSeconds ?? null;
    return {
      maxLifetimeSeconds,
      idleTimeoutSeconds: record?.idleTimeoutSeconds ?? this.#definition.lifecycle.idleTimeoutSeconds ?? null,
      expiresAt: record && maxLifetimeSeconds !== null ? record.createdAt + maxLifetimeSeconds * 1000 : null,
    };
  }

  /** True when this VM's lifetime is bounded and over. */
  #pastLifetime(): boolean {
    const record = this.#store.getVm(this.definitionName, this.key);
    if (!record || record.destroying) return false;
    const { expiresAt } = this.#lifecycle(record);
    return expiresAt !== null && expiresAt <= Date.now();
  }

  /** setLifecycle on the awake VM: stored on its row; a lifetime already over destroys it. */
  #setLifecycle(bounds: { maxLifetimeSeconds?: number | null; idleTimeoutSeconds?: number | null }): VmLifecycle {
    const record = this.#store.getVm(this.definitionName, this.key)!;
    this.#store.setLifecycle(
      this.definitionName,
      this.key,
      bounds.maxLifetimeSeconds === undefined ? record.maxLifetimeSeconds : bounds.maxLifetimeSeconds,
      bounds.idleTimeoutSeconds === undefined ? record.idleTimeoutSeconds : bounds.idleTimeoutSeconds,
    );
    // In force from the next sleep check (this call holds the VM awake until it answers). A
    // lifetime already over is the sweep's to end, within a second, after this answer goes out.
    const inForce = this.#lifecycle();
    this.#idleTimeoutSeconds = inForce.idleTimeoutSeconds;
    return inForce;
  }

  /** Stops the VM's processes and frees it; files and SQLite rows stay. */
  async sleep(): Promise<void> {
    this.#cancelSleep();
    const vm = this.#vm;
    this.#vm = undefined;
    await vm?.dispose();
    if (vm && !this.#destroying) await this.#recordDiskUse();
    this.#checkIdle();
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

  /** Measured as it goes to sleep, when nothing writes: listing VMs then costs no walk of their files. */
  async #recordDiskUse(): Promise<void> {
    const record = this.#store.getVm(this.definitionName, this.key);
    if (!record) return;
    const bytes = await diskUsage(join(this.#dataDir, "vms", record.directory)).catch(() => undefined);
    if (bytes !== undefined && this.#store.db.isOpen) this.#store.setDiskBytes(this.definitionName, this.key, bytes);
  }

  async close(): Promise<void> {
    this.#closed = true;
    await this.#destroying?.catch(() => undefined);
    await this.#waking?.catch(() => undefined);
    await this.sleep();
  }

  /** Ends the VM for good (see the file header); concurrent destroys share one. */
  destroy(): Promise<DestroyResult> {
    this.#destroying ??= this.#destroy().finally(() => {
      this.#destroying = undefined;
      this.#checkIdle();
    });
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
    // The saved copy goes too, or a node that lost its disk would bring the VM back.
    await this.#saveDurableState();
    return { key: this.key, existed };
  }

  async #create(): Promise<Vm> {
    const record = this.#store.getVm(this.definitionName, this.key);
    if (record?.destroying) {
      throw new AgentVmError("VM_DESTROY_FAILED", `VM ${JSON.stringify(this.key)} (${this.definitionName}) is half destroyed (a destroy failed or was interrupted); destroy it again to finish, then the key starts a fresh VM`);
    }
    if (!record) {
      // Counted and inserted in one synchronous step, so concurrent creations cannot pass the cap together.
      const count = this.#store.countVms(this.definitionName);
      if (count >= this.#maxVms) {
        throw new AgentVmError(
          "TOO_MANY_VMS",
          `cannot create VM ${JSON.stringify(this.key)}: definition ${this.definitionName} already has ${count} VMs (limits.maxVmsPerDefinition = ${this.#maxVms}); destroy VMs you no longer need, or raise the limit`,
        );
      }
      this.#store.ensureVm(this.definitionName, this.key, vmDirectoryName(this.key));
    }
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
      {
        previews: new PreviewTokens(this.#previews, this.#definition.preview, { definition: this.definitionName, key: this.key, urlFor: this.#previewUrl, ...(this.#previewOwner !== undefined ? { owner: this.#previewOwner } : {}) }),
        wakeProcesses: {
          add: (process) => this.#store.addWakeProcess(this.definitionName, this.key, process),
          remove: (id) => this.#store.removeWakeProcess(this.definitionName, this.key, id),
        },
        lifecycle: { set: (bounds) => this.#setLifecycle(bounds) },
      },
    );
    vm.on("processOutput", (event) => {
      for (const listener of this.#listeners) listener.processOutput(event);
    });
    vm.on("processExit", (event) => {
      for (const listener of this.#listeners) listener.processExit(event);
      this.#scheduleSleep();
    });
    this.#vm = vm;
    this.#wokeAt = Date.now();
    this.#idleTimeoutSeconds = this.#lifecycle().idleTimeoutSeconds;
    // A VM just made has a row the cluster's copy does not know yet (a stream or preview may be its first use).
    if (!record) await this.#saveDurableState().catch(() => undefined);
    await this.#startOnWake(vm);
    this.#scheduleSleep();
    return vm;
  }

  /** The definition's services and the processes spawned with restartOnWake, started as the VM wakes. */
  async #startOnWake(vm: Vm): Promise<void> {
    const starts: [what: string, start: () => Promise<{ pid: number }>][] = [
      ...this.#definition.services.map((service): [string, () => Promise<{ pid: number }>] => [
        service.command,
        () => vm.spawn(service.command, [...(service.args ?? [])], { ...(service.cwd ? { cwd: service.cwd } : {}), ...(service.env ? { env: { ...service.env } } : {}) }),
      ]),
      ...this.#store.wakeProcesses(this.definitionName, this.key).map((process): [string, () => Promise<{ pid: number }>] => [process.command, () => vm.resumeWakeProcess(process)]),
    ];
    for (const [what, start] of starts) {
      try {
        // A preview of a dev server that was asleep is then served by it rather than refused while it
        // starts: requests to a closed port wait (in init) for it, in the first RESTART_GRACE_MS after
        // the wake only — which ports it will open is not known, so a port none opens must not wait long.
        vm.expectListener((await start()).pid, Math.max(0, this.#wokeAt + RESTART_GRACE_MS - Date.now()));
      } catch (error) {
        // One that cannot start does not keep the VM from waking; it is tried again on the next wake.
        log("warn", `could not start ${JSON.stringify(what)} on wake: ${(error as Error).message}`, { definition: this.definitionName, key: this.key });
      }
    }
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
    // Running processes keep a VM awake, unless lifecycle.idleTimeoutSeconds says how long they may without any client.
    const idleTimeoutSeconds = this.#idleTimeoutSeconds;
    const busy = vm.runningProcessCount() > 0;
    if (busy && idleTimeoutSeconds === null) return;
    this.#sleepTimer = setTimeout(
      () => {
        this.#sleepTimer = undefined;
        // Re-check: a request or a process may have started since the timer was set.
        if (this.#holds > 0 || this.#vm !== vm) return;
        if (!busy && vm.runningProcessCount() > 0) return this.#scheduleSleep();
        void this.sleep();
      },
      busy ? idleTimeoutSeconds! * 1000 : this.#definition.sleepAfterMs,
    );
    this.#sleepTimer.unref();
  }

  #cancelSleep(): void {
    if (this.#sleepTimer) clearTimeout(this.#sleepTimer);
    this.#sleepTimer = undefined;
  }
}

/** Bytes a directory tree takes on disk (allocated blocks), not following symlinks. */
async function diskUsage(root: string): Promise<number> {
  let total = 0;
  const pending = [root];
  while (pending.length > 0) {
    const dir = pending.pop()!;
    const entries = await readdir(dir, { withFileTypes: true }).catch(() => []);
    for (const entry of entries) {
      const path = join(dir, entry.name);
      const stats = await lstat(path).catch(() => undefined);
      if (!stats) continue;
      total += stats.blocks * 512;
      if (entry.isDirectory()) pending.push(path);
    }
  }
  return total;
}

async function pathExists(path: string): Promise<boolean> {
  return access(path).then(
    () => true,
    () => false,
  );
}
