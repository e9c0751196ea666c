// A real OpenID Provider for portcullis's integration tests: panva's `oidc-provider` (a
// certified OP) on loopback, with one confidential client, the built-in development login
// and consent pages (any login is accepted; the password is ignored), RP-initiated logout,
// refresh tokens, the device authorization grant (RFC 8628, for `portcullis ctl login`),
// and a control port to rotate the signing key, change the client's redirect URIs, and stop
// or restart the provider on the same issuer and port.
//
// Usage: node server.mjs [--port N] [--control-port N]        (0 or absent: any free port)
//
// Environment (all optional):
//   IDP_PORT, IDP_CONTROL_PORT        ports, as the flags above
//   IDP_CLIENT_ID, IDP_CLIENT_SECRET  the test client (default portcullis / portcullis-test-secret)
//   IDP_REDIRECT_URIS                 comma-separated redirect_uris of the client
//   IDP_POST_LOGOUT_REDIRECT_URIS     comma-separated post_logout_redirect_uris
//   IDP_ACCESS_TOKEN_TTL, IDP_ID_TOKEN_TTL, IDP_REFRESH_TOKEN_TTL   seconds
//   IDP_ROTATE_REFRESH_TOKENS=1       every refresh returns a new refresh token, and reusing a
//                                     spent one revokes the whole grant (reuse detection)
//   IDP_EXIT_ON_STDIN_EOF=1           exit when stdin closes (the test process went away)
//
// Accounts: any login `x` is subject `x`, email `x@example.com`, and groups from GROUPS.
//
// Once both ports listen, one line is printed on stdout:
//   ready issuer=http://127.0.0.1:PORT control=http://127.0.0.1:CPORT kid=KID
//
// Control API (plain HTTP on the control port, JSON answers):
//   GET  /state                 { issuer, running, kids, token_requests }   kids[0] signs;
//                               token_requests counts POSTs to the token endpoint
//   POST /rotate[?drop_old=1]   new signing key (new kid) first; old keys stay published
//                               unless drop_old=1
//   POST /client                body { redirect_uris?, post_logout_redirect_uris? }
//   POST /refuse_tokens[?on=0]  answer every token request 400 invalid_grant (on=0: stop)
//   POST /stop                  close the OP's port (connections dropped); state is kept
//   POST /start                 listen again on the same port
//   POST /shutdown              exit the process

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import http from 'node:http';
import Provider from 'oidc-provider';

const GROUPS = {
  alice: ['eng'],
  bob: ['sales'],
  carol: ['eng', 'admins'],
};

function arg(name) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

function list(v) {
  return (v || '').split(',').map((s) => s.trim()).filter(Boolean);
}

function seconds(v, dflt) {
  const n = Number.parseInt(v || '', 10);
  return Number.isFinite(n) && n > 0 ? n : dflt;
}

const env = process.env;
const wantedPort = Number.parseInt(arg('port') || env.IDP_PORT || '0', 10);
const controlPort = Number.parseInt(arg('control-port') || env.IDP_CONTROL_PORT || '0', 10);
const ttl = {
  access: seconds(env.IDP_ACCESS_TOKEN_TTL, 3600),
  id: seconds(env.IDP_ID_TOKEN_TTL, 3600),
  refresh: seconds(env.IDP_REFRESH_TOKEN_TTL, 14 * 24 * 3600),
};
const client = {
  client_id: env.IDP_CLIENT_ID || 'portcullis',
  client_secret: env.IDP_CLIENT_SECRET || 'portcullis-test-secret',
  redirect_uris: list(env.IDP_REDIRECT_URIS),
  post_logout_redirect_uris: list(env.IDP_POST_LOGOUT_REDIRECT_URIS),
  grant_types: ['authorization_code', 'refresh_token', 'urn:ietf:params:oauth:grant-type:device_code'],
  response_types: ['code'],
  token_endpoint_auth_method: 'client_secret_basic',
};
// Stable across rebuilds, so the OP's own cookies survive a key rotation.
const cookieKeys = [randomBytes(32).toString('base64url')];

let keyCounter = 0;
function newKey() {
  keyCounter += 1;
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  return {
    ...privateKey.export({ format: 'jwk' }),
    kid: `test-key-${keyCounter}-${randomBytes(4).toString('hex')}`,
    alg: 'RS256',
    use: 'sig',
  };
}

let keys = [newKey()];
let issuer;
let handler;

// A fresh Provider from the current keys and client. Grants, sessions and tokens live in
// oidc-provider's in-memory adapter, which is module-wide, so they survive a rebuild.
function build() {
  const provider = new Provider(issuer, {
    clients: [client],
    jwks: { keys },
    cookies: { keys: cookieKeys },
    async findAccount(_ctx, id) {
      return {
        accountId: id,
        async claims() {
          return {
            sub: id,
            name: id,
            email: `${id}@example.com`,
            email_verified: true,
            groups: GROUPS[id] || [],
          };
        },
      };
    },
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['name'],
      groups: ['groups'],
    },
    scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],
    // Put the requested claims in the ID token too: portcullis reads the identity from it.
    conformIdTokenClaims: false,
    pkce: { required: () => true },
    issueRefreshToken: async (_ctx, c) => c.grantTypeAllowed('refresh_token'),
    ...(env.IDP_ROTATE_REFRESH_TOKENS === '1' ? { rotateRefreshToken: () => true } : {}),
    ttl: {
      AccessToken: ttl.access,
      IdToken: ttl.id,
      RefreshToken: ttl.refresh,
      AuthorizationCode: 60,
      Interaction: 600,
      Session: 3600,
      Grant: 3600,
    },
    features: {
      devInteractions: { enabled: true },
      // RFC 8628, for `portcullis ctl login`: the user code pages at /device are the
      // provider's own (confirm with "Continue", deny with "[ Abort ]").
      deviceFlow: { enabled: true },
      rpInitiatedLogout: { enabled: true },
      revocation: { enabled: false },
    },
    renderError(ctx, out) {
      ctx.type = 'json';
      ctx.body = out;
    },
  });
  provider.on('server_error', (_ctx, err) => console.error('server_error', err));
  handler = provider.callback();
}

let tokenRequests = 0;
let refuseTokens = false;

const server = http.createServer((req, res) => {
  if (!handler) {
    res.writeHead(503).end();
    return;
  }
  if (req.method === 'POST' && new URL(req.url, issuer).pathname === '/token') {
    tokenRequests += 1;
    if (refuseTokens) {
      req.resume();
      res.writeHead(400, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: 'invalid_grant', error_description: 'grant refused' }));
      return;
    }
  }
  handler(req, res);
});
let running = false;

function listen(port) {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => {
      server.off('error', reject);
      running = true;
      resolve(server.address().port);
    });
  });
}

function stop() {
  return new Promise((resolve) => {
    if (!running) {
      resolve();
      return;
    }
    running = false;
    server.close(() => resolve());
    server.closeAllConnections();
  });
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function state() {
  return { issuer, running, kids: keys.map((k) => k.kid), token_requests: tokenRequests };
}

const control = http.createServer(async (req, res) => {
  const url = new URL(req.url, 'http://control');
  const reply = (status, body) => {
    res.writeHead(status, { 'content-type': 'application/json' });
    res.end(JSON.stringify(body));
  };
  try {
    const route = `${req.method} ${url.pathname}`;
    switch (route) {
      case 'GET /state':
        return reply(200, state());
      case 'POST /rotate': {
        const fresh = newKey();
        keys = url.searchParams.get('drop_old') === '1' ? [fresh] : [fresh, ...keys];
        build();
        return reply(200, { kid: fresh.kid, ...state() });
      }
      case 'POST /client': {
        const body = JSON.parse((await readBody(req)) || '{}');
        if (Array.isArray(body.redirect_uris)) client.redirect_uris = body.redirect_uris;
        if (Array.isArray(body.post_logout_redirect_uris)) {
          client.post_logout_redirect_uris = body.post_logout_redirect_uris;
        }
        build();
        return reply(200, { client_id: client.client_id, redirect_uris: client.redirect_uris });
      }
      case 'POST /refuse_tokens':
        refuseTokens = url.searchParams.get('on') !== '0';
        return reply(200, state());
      case 'POST /stop':
        await stop();
        return reply(200, state());
      case 'POST /start':
        if (!running) await listen(Number(new URL(issuer).port));
        return reply(200, state());
      case 'POST /shutdown':
        reply(200, { bye: true });
        setImmediate(() => process.exit(0));
        return undefined;
      default:
        return reply(404, { error: `no control route ${route}` });
    }
  } catch (e) {
    return reply(500, { error: String(e && e.stack ? e.stack : e) });
  }
});

const port = await listen(wantedPort);
issuer = `http://127.0.0.1:${port}`;
build();
await new Promise((resolve) => {
  control.listen(controlPort, '127.0.0.1', resolve);
});
const cport = control.address().port;

if (env.IDP_EXIT_ON_STDIN_EOF === '1') {
  process.stdin.on('end', () => process.exit(0));
  process.stdin.on('error', () => process.exit(0));
  process.stdin.resume();
}
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => process.exit(0));

process.stdout.write(`ready issuer=${issuer} control=http://127.0.0.1:${cport} kid=${keys[0].kid}\n`);
