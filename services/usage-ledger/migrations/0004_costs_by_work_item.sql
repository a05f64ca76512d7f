-- The board's cost of each card (`WorkItemCosts`) sums total_cost_usd over every run of
-- up to 3,200 items: with the cost in the index the sum reads the index alone, not one
-- table row per run (about half the time: 5.5 against 2.9 ms for 1,200 items of 100,000 runs on
-- SQLite, docs/benchmarks.md).
CREATE INDEX agent_runs_cost_by_work_item ON agent_runs (work_item, total_cost_usd);
