// graphile-worker's side of `orchestrator-bench pg-queue`: no-op job throughput, counted
// the way shared/design/BENCHMARKS.md does.
//
//   NODE_PATH=<dir with graphile-worker@0.17.3>/node_modules \
//     node noop-throughput.js <postgres url> <jobs> <config>
//
// config: `default` (no batching), `local-queue-11` or `local-queue-500` (localQueue of
// that size, completeJobBatchDelay and failJobBatchDelay 0).
//
// Method: migrate; enqueue N no-op jobs in one addJobs call; ANALYZE and CHECKPOINT;
// start run({concurrency: 10}); jobs/s = N / (first task start -> jobs table empty);
// every job checked to have run exactly once. Prints one JSON line.
"use strict";

const { makeWorkerUtils, run, Logger } = require("graphile-worker");

const CONFIGS = {
  default: {},
  "local-queue-11": { localQueue: { size: 11 }, completeJobBatchDelay: 0, failJobBatchDelay: 0 },
  "local-queue-500": { localQueue: { size: 500 }, completeJobBatchDelay: 0, failJobBatchDelay: 0 },
};

const quiet = new Logger(() => () => {});
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
  const [connectionString, n, config] = process.argv.slice(2);
  const jobs = Number(n);
  if (!connectionString || !Number.isInteger(jobs) || jobs < 1 || !(config in CONFIGS)) {
    throw new Error(
      `usage: node noop-throughput.js <postgres url> <jobs> <${Object.keys(CONFIGS).join("|")}>`,
    );
  }
  const utils = await makeWorkerUtils({ connectionString, logger: quiet });
  await utils.migrate();
  const specs = Array.from({ length: jobs }, (_, i) => ({ identifier: "noop", payload: { i } }));
  await utils.addJobs(specs);
  await utils.withPgClient(async (c) => {
    await c.query("ANALYZE");
    await c.query("CHECKPOINT");
  });

  const runs = new Uint32Array(jobs);
  let done = 0;
  let first = null;
  const taskList = {
    noop: async (payload) => {
      if (first === null) first = process.hrtime.bigint();
      runs[payload.i] += 1;
      done += 1;
    },
  };
  const runner = await run({
    connectionString,
    concurrency: 10,
    noHandleSignals: true,
    logger: quiet,
    taskList,
    preset: { worker: CONFIGS[config] },
  });
  const deadline = Date.now() + 30 * 60 * 1000;
  // Cheap in-process progress first, then the queue's own word that it is empty.
  while (done < jobs) {
    if (Date.now() > deadline) throw new Error(`only ${done} of ${jobs} ran`);
    await sleep(1);
  }
  for (;;) {
    const { rows } = await utils.withPgClient((c) =>
      c.query("select count(*)::int as left from graphile_worker._private_jobs"),
    );
    if (rows[0].left === 0) break;
    if (Date.now() > deadline) throw new Error(`${rows[0].left} jobs left in the table`);
    await sleep(1);
  }
  const seconds = Number(process.hrtime.bigint() - first) / 1e9;
  await runner.stop();
  await utils.release();
  const wrong = [];
  for (let i = 0; i < jobs; i++) if (runs[i] !== 1) wrong.push(`${i}: ${runs[i]}`);
  if (wrong.length > 0) {
    throw new Error(`jobs not run exactly once: ${wrong.slice(0, 10).join(", ")}`);
  }
  console.log(JSON.stringify({ config, jobs, seconds, jobs_per_s: jobs / seconds, exactly_once: true }));
}

main().catch((e) => {
  console.error(e && e.stack ? e.stack : String(e));
  process.exit(1);
});
