package local.pipeline.kafka;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;

import java.io.IOException;
import java.math.BigInteger;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.URI;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.KeyPair;
import java.security.KeyPairGenerator;
import java.security.KeyStore;
import java.security.Provider;
import java.security.Security;
import java.security.cert.Certificate;
import java.security.cert.CertificateParsingException;
import java.security.cert.X509Certificate;
import java.security.spec.ECGenParameterSpec;
import java.util.Base64;
import java.util.Arrays;
import java.util.Date;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.atomic.AtomicInteger;

import javax.net.ssl.KeyManagerFactory;
import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLHandshakeException;
import javax.net.ssl.SSLParameters;
import javax.net.ssl.TrustManagerFactory;

import com.sun.net.httpserver.HttpHandler;
import com.sun.net.httpserver.HttpsConfigurator;
import com.sun.net.httpserver.HttpsExchange;
import com.sun.net.httpserver.HttpsParameters;
import com.sun.net.httpserver.HttpsServer;
import io.spiffe.provider.SpiffeProviderConstants;
import org.apache.kafka.common.acl.AclOperation;
import org.apache.kafka.common.network.ClientInformation;
import org.apache.kafka.common.network.ListenerName;
import org.apache.kafka.common.protocol.ApiKeys;
import org.apache.kafka.common.requests.RequestContext;
import org.apache.kafka.common.requests.RequestHeader;
import org.apache.kafka.common.resource.PatternType;
import org.apache.kafka.common.resource.ResourcePattern;
import org.apache.kafka.common.resource.ResourceType;
import org.apache.kafka.common.security.auth.SecurityProtocol;
import org.apache.kafka.common.utils.SecurityUtils;
import org.apache.kafka.server.authorizer.Action;
import org.apache.kafka.server.authorizer.AuthorizationResult;
import org.bouncycastle.asn1.x500.X500Name;
import org.bouncycastle.asn1.x509.BasicConstraints;
import org.bouncycastle.asn1.x509.Extension;
import org.bouncycastle.asn1.x509.GeneralName;
import org.bouncycastle.asn1.x509.GeneralNames;
import org.bouncycastle.cert.X509v3CertificateBuilder;
import org.bouncycastle.cert.jcajce.JcaX509CertificateConverter;
import org.bouncycastle.cert.jcajce.JcaX509v3CertificateBuilder;
import org.bouncycastle.operator.jcajce.JcaContentSignerBuilder;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;
import org.openpolicyagent.kafka.AllowCallable;

/**
 * The plugin's HTTP client, once MutualTlsOpaAuthorizer is configured with the broker's PEM
 * {@code ssl.*} settings (or, as under Strimzi, the authorizer's {@code opa.authorizer.ssl.*}),
 * presents the broker's SVID and trusts only the bundle: against a stand-in OPA that requires a
 * client certificate, as OPA with --authentication=tls does. Super users are allowed without
 * asking OPA; the SPIFFE provider is installed when the TLS settings name it, once.
 */
class MutualTlsOpaAuthorizerTest {

    private static final String BROKER = "spiffe://pipeline.local/broker/kafka";
    /** Kafka's format, as Strimzi writes it: its broker by DN, then the Kafka resource's superUsers. */
    private static final String SUPER_USERS = "User:CN=pipeline-kafka,O=io.strimzi;User:CN=cluster-operator,O=io.strimzi;User:" + BROKER;

    @TempDir
    Path dir;

    @Test
    void theBrokersSvidIsPresentedToOpa() throws Exception {
        Issuer ca = new Issuer("CN=dev CA");
        HttpsServer opa = opa(ca, ca);
        try {
            configure(ca, opa);
            HttpResponse<String> response = ask(opa);
            assertEquals(200, response.statusCode());
            assertEquals(BROKER, response.body()); // the URI SAN the server saw
        } finally {
            opa.stop(0);
        }
    }

    @Test
    void anOpaWhoseCertificateIsNotFromTheBundleIsNotTrusted() throws Exception {
        Issuer ca = new Issuer("CN=dev CA");
        HttpsServer impostor = opa(new Issuer("CN=another CA"), ca);
        try {
            configure(ca, impostor);
            assertThrows(SSLHandshakeException.class, () -> ask(impostor));
        } finally {
            impostor.stop(0);
        }
    }

    @Test
    void underStrimziTheAuthorizersOwnTlsSettingsOverrideTheBrokers() throws Exception {
        Issuer ca = new Issuer("CN=dev CA");
        HttpsServer opa = opa(ca, ca);
        try {
            // Strimzi writes no ssl.* key store of the broker's own (its listeners' are per listener);
            // one that is there (here another CA's identity) loses to opa.authorizer.ssl.*.
            Map<String, Object> configs = new HashMap<>(Map.of(
                "opa.authorizer.url", url(opa),
                "ssl.endpoint.identification.algorithm", "HTTPS"));
            configs.putAll(pemSettings("ssl.", new Issuer("CN=another CA"), "spiffe://elsewhere.example/x", "other"));
            configs.putAll(pemSettings(MutualTlsOpaAuthorizer.SSL_PREFIX, ca, BROKER, "svid"));
            new MutualTlsOpaAuthorizer().configure(configs);
            assertEquals(BROKER, ask(opa).body());
        } finally {
            opa.stop(0);
        }
    }

    /**
     * super.users is honoured by the plugin (OpaAuthorizer 1.5.1 allows them before asking OPA),
     * through our subclass: against an OPA that denies everything and counts its questions.
     */
    @Test
    void superUsersAreAllowedWithoutAskingOpaAndOthersAreAsked() throws Exception {
        Issuer ca = new Issuer("CN=dev CA");
        AtomicInteger asked = new AtomicInteger();
        HttpsServer opa = opa(ca, ca, exchange -> {
            asked.incrementAndGet();
            exchange.getRequestBody().readAllBytes();
            byte[] body = "{\"result\": false}".getBytes(StandardCharsets.UTF_8);
            exchange.sendResponseHeaders(200, body.length);
            exchange.getResponseBody().write(body);
            exchange.close();
        });
        try {
            MutualTlsOpaAuthorizer authorizer = new MutualTlsOpaAuthorizer();
            Map<String, Object> configs = new HashMap<>(pemSettings("ssl.", ca, BROKER, "svid"));
            configs.put("opa.authorizer.url", url(opa));
            configs.put("opa.authorizer.allow.on.error", "false");
            configs.put("super.users", SUPER_USERS);
            authorizer.configure(configs);

            for (String superUser : new String[] {"User:CN=pipeline-kafka,O=io.strimzi", "User:" + BROKER}) {
                assertEquals(List.of(AuthorizationResult.ALLOWED), authorizer.authorize(request(superUser), List.of(readTopic())),
                    superUser);
            }
            assertEquals(0, asked.get(), "OPA was asked about a super user");

            assertEquals(List.of(AuthorizationResult.DENIED),
                authorizer.authorize(request("User:spiffe://pipeline.local/service/ingester"), List.of(readTopic())));
            assertEquals(1, asked.get(), "OPA decides for everyone else");
        } finally {
            opa.stop(0);
        }
    }

    // ---- the SPIFFE provider (its key and trust managers read the Workload API only when
    // initialised, which these tests never do: they check the algorithms resolve) ------------------

    @BeforeEach
    @AfterEach
    void noSpiffeProvider() {
        Security.removeProvider(SpiffeProviderConstants.PROVIDER_NAME);
    }

    @Test
    void theSpiffeProviderIsInstalledWhenTheAuthorizersTlsSettingsNameIt() throws Exception {
        MutualTlsOpaAuthorizer.installSpiffeProviderIfNamed(MutualTlsOpaAuthorizer.tlsSettings(Map.of(
            "opa.authorizer.ssl.keymanager.algorithm", "Spiffe",
            "opa.authorizer.ssl.trustmanager.algorithm", "Spiffe")));
        assertNotNull(Security.getProvider(SpiffeProviderConstants.PROVIDER_NAME));
        assertEquals(SpiffeProviderConstants.PROVIDER_NAME, KeyManagerFactory.getInstance("Spiffe").getProvider().getName());
        assertEquals(SpiffeProviderConstants.PROVIDER_NAME, TrustManagerFactory.getInstance("Spiffe").getProvider().getName());
    }

    @Test
    void theSpiffeProviderIsNotInstalledWhenNothingNamesIt() throws Exception {
        MutualTlsOpaAuthorizer.installSpiffeProviderIfNamed(MutualTlsOpaAuthorizer.tlsSettings(pemSettings("ssl.", new Issuer("CN=dev CA"), BROKER, "svid")));
        assertNull(Security.getProvider(SpiffeProviderConstants.PROVIDER_NAME));
    }

    @Test
    void installingItAfterSecurityProvidersIsANoOp() {
        // Natively: the broker's security.providers, then (or before) the authorizer's own check.
        SecurityUtils.addConfiguredSecurityProviders(Map.of("security.providers", SpiffeProviderCreator.class.getName()));
        List<Provider> before = Arrays.asList(Security.getProviders());
        MutualTlsOpaAuthorizer.installSpiffeProviderIfNamed(Map.of("ssl.keymanager.algorithm", "Spiffe", "ssl.trustmanager.algorithm", "Spiffe"));
        MutualTlsOpaAuthorizer.installSpiffeProviderIfNamed(Map.of("ssl.keymanager.algorithm", "Spiffe"));
        assertEquals(before, Arrays.asList(Security.getProviders()));
        assertEquals(1, before.stream().filter(p -> p.getName().equals(SpiffeProviderConstants.PROVIDER_NAME)).count());
    }

    /** Configure the authorizer as the broker's server.properties does (PEM key store and bundle). */
    private void configure(Issuer ca, HttpsServer opa) throws Exception {
        Map<String, Object> configs = new HashMap<>(pemSettings("ssl.", ca, BROKER, "svid"));
        configs.put("opa.authorizer.url", url(opa));
        new MutualTlsOpaAuthorizer().configure(configs);
    }

    /**
     * PEM key store (a new key, with a certificate from {@code ca} for {@code id}) and bundle
     * ({@code ca}) settings under {@code prefix}, in files named after {@code name}.
     */
    private Map<String, String> pemSettings(String prefix, Issuer ca, String id, String name) throws Exception {
        KeyPair key = keyPair();
        X509Certificate svid = ca.issue(key, new GeneralName(GeneralName.uniformResourceIdentifier, id));
        Path keystore = dir.resolve(name + "-keystore.pem");
        Path bundle = dir.resolve(name + "-bundle.pem");
        Files.writeString(keystore, pem("PRIVATE KEY", key.getPrivate().getEncoded()) + pem("CERTIFICATE", svid.getEncoded()));
        Files.writeString(bundle, pem("CERTIFICATE", ca.cert.getEncoded()));
        return Map.of(
            prefix + "keystore.type", "PEM",
            prefix + "keystore.location", keystore.toString(),
            prefix + "truststore.type", "PEM",
            prefix + "truststore.location", bundle.toString());
    }

    /** A request as the broker hands it to the authorizer, from {@code principal} on the client listener. */
    private static RequestContext request(String principal) {
        RequestHeader header = new RequestHeader(ApiKeys.FETCH, ApiKeys.FETCH.latestVersion(), "test-client", 1);
        return new RequestContext(header, "connection-1", InetAddress.getLoopbackAddress(),
            SecurityUtils.parseKafkaPrincipal(principal), ListenerName.normalised("TLS-9093"), SecurityProtocol.SSL,
            ClientInformation.EMPTY, false);
    }

    private static Action readTopic() {
        return new Action(AclOperation.READ, new ResourcePattern(ResourceType.TOPIC, "pipeline.raw", PatternType.LITERAL),
            1, true, true);
    }

    /** A request through the client every decision of the plugin goes through. */
    private static HttpResponse<String> ask(HttpsServer opa) throws Exception {
        HttpRequest request = HttpRequest.newBuilder(URI.create(url(opa))).POST(HttpRequest.BodyPublishers.ofString("{}")).build();
        return AllowCallable.client().send(request, HttpResponse.BodyHandlers.ofString());
    }

    private static String url(HttpsServer opa) {
        return "https://127.0.0.1:" + opa.getAddress().getPort() + "/v1/data/kafka/authz/allow";
    }

    /**
     * An HTTPS server on 127.0.0.1 with a certificate from {@code serverCa} that requires a client
     * certificate from {@code clientCa} and answers with the client's URI SAN.
     */
    private static HttpsServer opa(Issuer serverCa, Issuer clientCa) throws Exception {
        return opa(serverCa, clientCa, exchange -> {
            X509Certificate client = (X509Certificate) ((HttpsExchange) exchange).getSSLSession().getPeerCertificates()[0];
            byte[] body = uriSan(client).getBytes(StandardCharsets.UTF_8);
            exchange.sendResponseHeaders(200, body.length);
            exchange.getResponseBody().write(body);
            exchange.close();
        });
    }

    /** The same server, answering with {@code handler}. */
    private static HttpsServer opa(Issuer serverCa, Issuer clientCa, HttpHandler handler) throws Exception {
        KeyPair key = keyPair();
        X509Certificate cert = serverCa.issue(key, new GeneralName(GeneralName.iPAddress, "127.0.0.1"));
        KeyStore keys = KeyStore.getInstance("PKCS12");
        keys.load(null, null);
        keys.setKeyEntry("opa", key.getPrivate(), new char[0], new Certificate[] {cert, serverCa.cert});
        KeyManagerFactory kmf = KeyManagerFactory.getInstance(KeyManagerFactory.getDefaultAlgorithm());
        kmf.init(keys, new char[0]);
        KeyStore trusted = KeyStore.getInstance("PKCS12");
        trusted.load(null, null);
        trusted.setCertificateEntry("ca", clientCa.cert);
        TrustManagerFactory tmf = TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        tmf.init(trusted);
        SSLContext context = SSLContext.getInstance("TLS");
        context.init(kmf.getKeyManagers(), tmf.getTrustManagers(), null);

        HttpsServer server = HttpsServer.create(new InetSocketAddress(InetAddress.getLoopbackAddress(), 0), 0);
        server.setHttpsConfigurator(new HttpsConfigurator(context) {
            @Override
            public void configure(HttpsParameters params) {
                SSLParameters ssl = context.getDefaultSSLParameters();
                ssl.setNeedClientAuth(true);
                params.setSSLParameters(ssl);
            }
        });
        server.createContext("/", handler);
        server.start();
        return server;
    }

    private static String uriSan(X509Certificate cert) throws IOException {
        try {
            for (List<?> san : cert.getSubjectAlternativeNames()) {
                if (Integer.valueOf(GeneralName.uniformResourceIdentifier).equals(san.get(0))) {
                    return (String) san.get(1);
                }
            }
            return "";
        } catch (CertificateParsingException e) {
            throw new IOException(e);
        }
    }

    private static KeyPair keyPair() throws Exception {
        KeyPairGenerator kpg = KeyPairGenerator.getInstance("EC");
        kpg.initialize(new ECGenParameterSpec("secp256r1"));
        return kpg.generateKeyPair();
    }

    private static String pem(String type, byte[] der) {
        String body = Base64.getMimeEncoder(64, "\n".getBytes(StandardCharsets.US_ASCII)).encodeToString(der);
        return "-----BEGIN " + type + "-----\n" + body + "\n-----END " + type + "-----\n";
    }

    /** A CA that issues leaf certificates with one subjectAltName. */
    private static final class Issuer {
        final KeyPair key;
        final X509Certificate cert;

        Issuer(String subject) throws Exception {
            key = keyPair();
            X500Name name = new X500Name(subject);
            X509v3CertificateBuilder b = builder(name, name, key);
            b.addExtension(Extension.basicConstraints, true, new BasicConstraints(0));
            cert = sign(b);
        }

        X509Certificate issue(KeyPair leaf, GeneralName san) throws Exception {
            X509v3CertificateBuilder b = builder(new X500Name(cert.getSubjectX500Principal().getName()),
                new X500Name("O=SPIFFE"), leaf);
            b.addExtension(Extension.subjectAlternativeName, false, new GeneralNames(san));
            return sign(b);
        }

        private X509v3CertificateBuilder builder(X500Name issuer, X500Name subject, KeyPair subjectKey) {
            long now = System.currentTimeMillis();
            return new JcaX509v3CertificateBuilder(issuer, BigInteger.valueOf(System.nanoTime()),
                new Date(now - 60_000), new Date(now + 3_600_000), subject, subjectKey.getPublic());
        }

        private X509Certificate sign(X509v3CertificateBuilder b) throws Exception {
            return new JcaX509CertificateConverter()
                .getCertificate(b.build(new JcaContentSignerBuilder("SHA256withECDSA").build(key.getPrivate())));
        }
    }
}
