// Drives ratepool's OpenAI-compatible endpoint with the official `openai`
// Node SDK (pinned in package.json / package-lock.json), unmodified: only
// `baseURL` and `apiKey` point it at the pool.
//
// Run by tests/e2e_sdk.rs:
//
//   RATEPOOL_BASE_URL=http://HOST/v1 RATEPOOL_API_KEY=KEY node openai_sdk.mjs SCENARIO [ARGS]
//
// Scenarios:
//   basic                 completions (plain, streamed, with usage), embeddings,
//                         models, and the SDK's error classes
//   retry                 spends the org's burst, then a call with a short
//                         Ratepool-Max-Wait gets a 429; the SDK's own retry
//                         must succeed after the retry-after it was given
//   chain JOB STEPS       a chain of durable calls (key JOB/step-N), each fed
//                         the answer before it; one JSON line per step
//   saturate CLIENTS STEPS  CLIENTS concurrent clients each running a chain of
//                         STEPS calls; prints the makespan and every failure
//
// Any mismatch exits non-zero with a message on stderr.

import OpenAI from 'openai';

const CHAT = 'gpt-4o-mini';
const EMBED = 'text-embedding-3-small';
const baseURL = process.env.RATEPOOL_BASE_URL;
const apiKey = process.env.RATEPOOL_API_KEY;

function fail(message) {
  console.error(`openai_sdk.mjs: ${message}`);
  process.exit(1);
}

function check(condition, message) {
  if (!condition) fail(message);
}

const user = (text) => [{ role: 'user', content: text }];

async function basic() {
  const c = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
  const ids = (await c.models.list()).data.map((m) => m.id);
  check(ids.includes(CHAT) && ids.includes(EMBED), `models: ${ids}`);

  const { data: completion, response } = await c.chat.completions
    .create({ model: CHAT, messages: user('Name a lighthouse.'), max_tokens: 30 })
    .withResponse();
  check(response.headers.get('x-ratepool-org'), 'no x-ratepool-org header');
  check(response.headers.get('x-ratelimit-remaining-tokens'), 'no x-ratelimit-remaining-tokens header');
  const text = completion.choices[0].message.content;
  check(text, `empty completion: ${JSON.stringify(completion)}`);
  check(completion.usage.completion_tokens > 0, 'no usage');

  let streamed = '';
  let sawUsage = false;
  const stream = await c.chat.completions.create({
    model: CHAT, messages: user('Name a lighthouse.'), max_tokens: 30, stream: true,
  });
  for await (const chunk of stream) {
    streamed += chunk.choices[0]?.delta?.content ?? '';
    if (chunk.usage) sawUsage = true;
  }
  check(streamed === text, `streamed ${JSON.stringify(streamed)} != whole ${JSON.stringify(text)}`);
  check(!sawUsage, 'a usage chunk the client did not ask for');

  let last = null;
  const withUsage = await c.chat.completions.create({
    model: CHAT, messages: user('Name a lighthouse.'), max_tokens: 30, stream: true,
    stream_options: { include_usage: true },
  });
  for await (const chunk of withUsage) last = chunk;
  check(last?.usage?.completion_tokens > 0, 'no usage chunk when asked');

  const emb = await c.embeddings.create({ model: EMBED, input: ['a lighthouse', 'a keeper'] });
  check(emb.data.length === 2 && emb.data[0].embedding.length > 0, 'embeddings');

  try {
    await c.chat.completions.create({ model: 'gpt-4o-mini-typo', messages: user('hi') });
    fail('an unknown model was accepted');
  } catch (e) {
    check(e instanceof OpenAI.BadRequestError && e.status === 400 && e.param === 'model', `unknown model: ${e}`);
  }
  try {
    await c.chat.completions.create({ model: CHAT, messages: [] });
    fail('empty messages were accepted');
  } catch (e) {
    check(e instanceof OpenAI.BadRequestError && e.param === 'messages', `empty messages: ${e}`);
  }
  try {
    await new OpenAI({ baseURL, apiKey: 'not-a-tenant-key-0000', maxRetries: 0 }).models.list();
    fail('a wrong key was accepted');
  } catch (e) {
    check(e instanceof OpenAI.AuthenticationError && e.code === 'invalid_api_key', `wrong key: ${e}`);
  }
  console.log(JSON.stringify({ ok: true }));
}

async function retry() {
  const c = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
  await c.chat.completions.create({ model: CHAT, messages: user('spend the burst'), max_tokens: 5800 });
  // Every attempt the SDK makes, with its status, through its own fetch hook.
  const statuses = [];
  const patient = new OpenAI({
    baseURL, apiKey, maxRetries: 3,
    defaultHeaders: { 'Ratepool-Max-Wait': '0.2' },
    fetch: async (url, init) => {
      const r = await fetch(url, init);
      statuses.push(r.status);
      return r;
    },
  });
  const started = performance.now();
  const completion = await patient.chat.completions.create({
    model: CHAT, messages: user('then this'), max_tokens: 400,
  });
  const elapsed = (performance.now() - started) / 1000;
  check(completion.choices[0].message.content, 'empty completion after the retry');
  check(statuses[0] === 429 && statuses[statuses.length - 1] === 200, `attempts: ${statuses}`);
  console.log(JSON.stringify({ statuses, elapsed_s: elapsed }));
}

async function chain(job, steps) {
  const c = new OpenAI({ baseURL, apiKey, maxRetries: 2 });
  let previous = 'A lighthouse keeper finds a message in a bottle.';
  for (let step = 1; step <= steps; step++) {
    const { data, response } = await c.chat.completions
      .create(
        { model: CHAT, messages: user(`Continue the story: ${previous}`), max_tokens: 40 },
        { headers: { 'Idempotency-Key': `${job}/step-${step}` } },
      )
      .withResponse();
    const content = data.choices[0].message.content;
    check(content, `step ${step}: empty answer`);
    const replayed = response.headers.get('idempotent-replayed') === 'true';
    console.log(JSON.stringify({ step, replayed, content }));
    previous = content;
  }
}

async function saturate(clients, steps) {
  const failures = [];
  const started = performance.now();
  await Promise.all(
    Array.from({ length: clients }, async (_, i) => {
      // No SDK retries: a 429 or any other error from ratepool is a failure.
      const c = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 120_000 });
      let previous = `Chain ${i}: a lighthouse keeper finds a message in a bottle.`;
      for (let step = 0; step < steps; step++) {
        try {
          const r = await c.chat.completions.create({
            model: CHAT, messages: user(`Continue: ${previous}`), max_tokens: 40,
          });
          previous = r.choices[0].message.content;
        } catch (e) {
          failures.push(`client ${i} step ${step}: ${e}`);
        }
      }
    }),
  );
  const makespan = (performance.now() - started) / 1000;
  console.log(JSON.stringify({ calls: clients * steps, failed: failures.length, makespan_s: makespan }));
  check(failures.length === 0, `${failures.length} calls failed, first: ${failures.slice(0, 3).join('; ')}`);
}

const [scenario, ...args] = process.argv.slice(2);
try {
  if (scenario === 'basic') await basic();
  else if (scenario === 'retry') await retry();
  else if (scenario === 'chain' && args.length === 2) await chain(args[0], Number(args[1]));
  else if (scenario === 'saturate' && args.length === 2) await saturate(Number(args[0]), Number(args[1]));
  else fail(`unknown scenario ${process.argv.slice(2)}`);
} catch (e) {
  fail(`${e?.constructor?.name}: ${e?.message ?? e}`);
}
