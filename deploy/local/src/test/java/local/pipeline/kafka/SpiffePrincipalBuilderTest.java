package local.pipeline.kafka;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.math.BigInteger;
import java.net.InetAddress;
import java.security.KeyPair;
import java.security.KeyPairGenerator;
import java.security.Principal;
import java.security.cert.Certificate;
import java.security.cert.X509Certificate;
import java.security.spec.ECGenParameterSpec;
import java.util.Arrays;
import java.util.Date;
import java.util.Map;

import javax.net.ssl.SSLPeerUnverifiedException;
import javax.net.ssl.SSLSession;
import javax.net.ssl.SSLSessionContext;

import org.apache.kafka.common.config.ConfigException;
import org.apache.kafka.common.errors.SslAuthenticationException;
import org.apache.kafka.common.security.auth.KafkaPrincipal;
import org.apache.kafka.common.security.auth.PlaintextAuthenticationContext;
import org.apache.kafka.common.security.auth.SslAuthenticationContext;
import org.apache.kafka.common.security.authenticator.DefaultKafkaPrincipalBuilder;
import org.apache.kafka.common.security.ssl.SslPrincipalMapper;
import org.bouncycastle.asn1.x500.X500Name;
import org.bouncycastle.asn1.x509.Extension;
import org.bouncycastle.asn1.x509.GeneralName;
import org.bouncycastle.asn1.x509.GeneralNames;
import org.bouncycastle.cert.X509v3CertificateBuilder;
import org.bouncycastle.cert.jcajce.JcaX509CertificateConverter;
import org.bouncycastle.cert.jcajce.JcaX509v3CertificateBuilder;
import org.bouncycastle.operator.jcajce.JcaContentSignerBuilder;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;

class SpiffePrincipalBuilderTest {

    private static final String INGESTER = "spiffe://pipeline.local/service/ingester";
    /** Strimzi's internal listeners, as Kafka names them to the builder. */
    private static final String REPLICATION = "REPLICATION-9091";
    private static final String CONTROLPLANE = "CONTROLPLANE-9090";
    /** What deploy/k8s/base/kafka.yaml sets. */
    private static final Map<String, String> STRIMZI = Map.of(
        SpiffePrincipalBuilder.DN_PRINCIPAL_LISTENERS_CONFIG, REPLICATION + "," + CONTROLPLANE);
    /**
     * A Strimzi broker's certificate from its cluster CA: a subject and DNS names, no SPIFFE ID.
     * Its subject is encoded O first, then CN: Kafka prints a subject as RFC 2253 does, last first,
     * and Strimzi's super.users name its brokers {@link #STRIMZI_BROKER_DN}.
     */
    private static final String STRIMZI_BROKER_SUBJECT = "O=io.strimzi,CN=pipeline-kafka";
    private static final String STRIMZI_BROKER_DN = "CN=pipeline-kafka,O=io.strimzi";

    private static KeyPair keyPair;

    @BeforeAll
    static void generateKey() throws Exception {
        // One key for every certificate: the builder never checks signatures (the TLS layer does).
        KeyPairGenerator kpg = KeyPairGenerator.getInstance("EC");
        kpg.initialize(new ECGenParameterSpec("secp256r1"));
        keyPair = kpg.generateKeyPair();
    }

    // ---- accepted --------------------------------------------------------------------------

    @Test
    void singleSpiffeUriBecomesUserPrincipal() throws Exception {
        KafkaPrincipal p = builder(Map.of()).build(ctx(cert("CN=ingester", uri(INGESTER))));
        assertEquals(KafkaPrincipal.USER_TYPE, p.getPrincipalType());
        assertEquals(INGESTER, p.getName());
        assertEquals("User:" + INGESTER, p.toString());
    }

    @Test
    void otherSanTypesAlongsideTheSpiffeIdAreIgnored() throws Exception {
        X509Certificate cert = cert("CN=ingester",
            dns("ingester.pipeline.local"), uri("https://example.org/x"), uri(INGESTER));
        assertEquals(INGESTER, builder(Map.of()).build(ctx(cert)).getName());
    }

    @Test
    void matchingConfiguredTrustDomainIsAccepted() throws Exception {
        KafkaPrincipal p = builder(Map.of(SpiffePrincipalBuilder.TRUST_DOMAIN_CONFIG, "pipeline.local"))
            .build(ctx(cert("CN=ingester", uri(INGESTER))));
        assertEquals(INGESTER, p.getName());
    }

    // ---- refused ---------------------------------------------------------------------------

    @Test
    void noSpiffeUriIsRefused() throws Exception {
        assertRefused(cert("CN=ingester", uri("https://pipeline.local/service/ingester")), "no spiffe:// URI SAN");
    }

    @Test
    void twoSpiffeUrisAreRefused() throws Exception {
        assertRefused(cert("CN=ingester", uri(INGESTER), uri("spiffe://pipeline.local/service/admin")),
            "expected exactly one");
    }

    @Test
    void dnsSanOnlyIsRefused() throws Exception {
        assertRefused(cert("CN=ingester", dns("ingester.pipeline.local")), "no spiffe:// URI SAN");
    }

    @Test
    void cnOnlyIsRefusedWithoutFallingBackToTheSubject() throws Exception {
        // Subject holds something that looks like an identity; it must not be used.
        assertRefused(cert("CN=" + INGESTER.replace(":", "")), "no spiffe:// URI SAN");
    }

    @ParameterizedTest
    @ValueSource(strings = {
        "spiffe://pipeline.local",
        "spiffe://pipeline.local/",
        "spiffe://pipeline.local/a/../b",
        "spiffe://pipeline.local/a/./b",
        "spiffe://pipeline.local/a//b",
        "spiffe://pipeline.local/a/",
        "spiffe://UPPER.local/x",
        "spiffe://pipeline.local/x?q=1",
        "spiffe://pipeline.local/x#frag",
        "spiffe://pipeline.local:8443/x",
        "spiffe://user@pipeline.local/x",
        "spiffe:///x",
        "spiffe://pipeline.local/a%2Fb",
        "SPIFFE://pipeline.local/x",
    })
    void malformedIdsAreRefused(String id) throws Exception {
        assertRefused(cert("CN=ingester", uri(id)), "malformed");
    }

    @Test
    void otherTrustDomainIsRefusedWhenTrustDomainIsConfigured() throws Exception {
        SpiffePrincipalBuilder b = builder(Map.of(SpiffePrincipalBuilder.TRUST_DOMAIN_CONFIG, "pipeline.local"));
        SslAuthenticationException e = assertThrows(SslAuthenticationException.class,
            () -> b.build(ctx(cert("CN=x", uri("spiffe://evil.example/service/ingester")))));
        assertTrue(e.getMessage().contains("not in the trust domain pipeline.local"), e.getMessage());
        // Without the setting, any well-formed trust domain is accepted.
        assertEquals("spiffe://evil.example/service/ingester",
            builder(Map.of()).build(ctx(cert("CN=x", uri("spiffe://evil.example/service/ingester")))).getName());
    }

    @Test
    void peerWithoutCertificateIsRefused() {
        SslAuthenticationContext ctx = new SslAuthenticationContext(
            new FakeSslSession(null), InetAddress.getLoopbackAddress(), "CLIENT");
        SslAuthenticationException e = assertThrows(SslAuthenticationException.class,
            () -> builder(Map.of()).build(ctx));
        assertTrue(e.getMessage().contains("no certificate"), e.getMessage());
        assertTrue(e.getCause() instanceof SSLPeerUnverifiedException);
    }

    @Test
    void nonSslContextIsRejected() {
        assertThrows(IllegalStateException.class, () -> builder(Map.of()).build(
            new PlaintextAuthenticationContext(InetAddress.getLoopbackAddress(), "PLAINTEXT")));
    }

    @Test
    void malformedConfiguredTrustDomainFailsConfiguration() {
        assertThrows(ConfigException.class,
            () -> builder(Map.of(SpiffePrincipalBuilder.TRUST_DOMAIN_CONFIG, "Pipeline.Local")));
        assertThrows(ConfigException.class,
            () -> builder(Map.of(SpiffePrincipalBuilder.TRUST_DOMAIN_CONFIG, "spiffe://pipeline.local")));
    }

    // ---- DN principals on the listeners named for them (Strimzi's internal ones) ---------------

    @Test
    void certificateWithoutSpiffeIdGetsKafkasDnPrincipalOnAListedListener() throws Exception {
        X509Certificate broker = cert(STRIMZI_BROKER_SUBJECT, dns("pipeline-kafka-0.pipeline-kafka-brokers.pipeline.svc"));
        for (String listener : new String[] {REPLICATION, CONTROLPLANE}) {
            KafkaPrincipal p = builder(STRIMZI).build(ctx(broker, listener));
            // The name Strimzi puts in super.users ...
            assertEquals("User:" + STRIMZI_BROKER_DN, p.toString());
            // ... and exactly what Kafka's default builder (default mapping rules) gives.
            assertEquals(new DefaultKafkaPrincipalBuilder(null, SslPrincipalMapper.fromRules("DEFAULT"))
                .build(ctx(broker, listener)), p);
        }
    }

    @Test
    void listedListenerNamesMatchWhateverTheirCase() throws Exception {
        SpiffePrincipalBuilder b = builder(Map.of(SpiffePrincipalBuilder.DN_PRINCIPAL_LISTENERS_CONFIG, " replication-9091 "));
        assertEquals(STRIMZI_BROKER_DN, b.build(ctx(cert(STRIMZI_BROKER_SUBJECT), REPLICATION)).getName());
    }

    @Test
    void theBrokersPrincipalMappingRulesApplyToDnPrincipals() throws Exception {
        Map<String, String> configs = Map.of(
            SpiffePrincipalBuilder.DN_PRINCIPAL_LISTENERS_CONFIG, REPLICATION,
            "ssl.principal.mapping.rules", "RULE:^CN=([^,]+),.*$/$1/,DEFAULT");
        assertEquals("pipeline-kafka", builder(configs).build(ctx(cert(STRIMZI_BROKER_SUBJECT), REPLICATION)).getName());
    }

    @Test
    void certificateWithoutSpiffeIdIsStillRefusedOnOtherListeners() throws Exception {
        X509Certificate broker = cert(STRIMZI_BROKER_SUBJECT, dns("pipeline-kafka-0.pipeline-kafka-brokers.pipeline.svc"));
        SslAuthenticationException e = assertThrows(SslAuthenticationException.class,
            () -> builder(STRIMZI).build(ctx(broker, "TLS-9093")));
        assertTrue(e.getMessage().contains("no spiffe:// URI SAN"), e.getMessage());
        // And on Strimzi's listeners too, unless they are named.
        assertThrows(SslAuthenticationException.class, () -> builder(Map.of()).build(ctx(broker, REPLICATION)));
    }

    @Test
    void aSpiffeIdKeepsItsPrincipalOnAListedListener() throws Exception {
        KafkaPrincipal p = builder(STRIMZI).build(ctx(cert(STRIMZI_BROKER_SUBJECT, uri(INGESTER)), REPLICATION));
        assertEquals("User:" + INGESTER, p.toString());
    }

    @Test
    void aBadSpiffeIdIsRefusedOnAListedListenerRatherThanFallingBackToTheDn() throws Exception {
        SpiffePrincipalBuilder b = builder(STRIMZI);
        assertThrows(SslAuthenticationException.class,
            () -> b.build(ctx(cert(STRIMZI_BROKER_SUBJECT, uri("spiffe://pipeline.local/a/../b")), REPLICATION)));
        assertThrows(SslAuthenticationException.class,
            () -> b.build(ctx(cert(STRIMZI_BROKER_SUBJECT, uri(INGESTER), uri("spiffe://pipeline.local/x")), REPLICATION)));
    }

    @ParameterizedTest
    @ValueSource(strings = {
        "REPLICATION-9091,,CONTROLPLANE-9090",
        "REPLICATION-9091,",
        ",REPLICATION-9091",
        "REPLICATION 9091",
        "REPLICATION-9091;CONTROLPLANE-9090",
        "SSL://0.0.0.0:9091",
    })
    void malformedListenerListFailsConfiguration(String value) {
        ConfigException e = assertThrows(ConfigException.class,
            () -> builder(Map.of(SpiffePrincipalBuilder.DN_PRINCIPAL_LISTENERS_CONFIG, value)));
        assertTrue(e.getMessage().contains(SpiffePrincipalBuilder.DN_PRINCIPAL_LISTENERS_CONFIG), e.getMessage());
    }

    // ---- serde -----------------------------------------------------------------------------

    @Test
    void serdeRoundTrip() {
        SpiffePrincipalBuilder b = new SpiffePrincipalBuilder();
        KafkaPrincipal original = new KafkaPrincipal(KafkaPrincipal.USER_TYPE, INGESTER);
        byte[] bytes = b.serialize(original);
        KafkaPrincipal back = b.deserialize(bytes);
        assertEquals(original, back);
        assertEquals(INGESTER, back.getName());
        // Same wire format as Kafka's default builder, so either side of a forward can read it.
        assertTrue(Arrays.equals(bytes,
            new org.apache.kafka.common.security.authenticator.DefaultKafkaPrincipalBuilder(null, null)
                .serialize(original)));
    }

    // ---- helpers ---------------------------------------------------------------------------

    private static SpiffePrincipalBuilder builder(Map<String, ?> configs) {
        SpiffePrincipalBuilder b = new SpiffePrincipalBuilder();
        b.configure(configs);
        return b;
    }

    private static void assertRefused(X509Certificate cert, String why) {
        SslAuthenticationException e = assertThrows(SslAuthenticationException.class,
            () -> builder(Map.of()).build(ctx(cert)));
        assertTrue(e.getMessage().contains(why), "message '" + e.getMessage() + "' should contain '" + why + "'");
    }

    private static SslAuthenticationContext ctx(X509Certificate leaf) {
        return ctx(leaf, "CLIENT");
    }

    private static SslAuthenticationContext ctx(X509Certificate leaf, String listener) {
        return new SslAuthenticationContext(
            new FakeSslSession(new Certificate[] {leaf}), InetAddress.getLoopbackAddress(), listener);
    }

    private static GeneralName uri(String uri) {
        return new GeneralName(GeneralName.uniformResourceIdentifier, uri);
    }

    private static GeneralName dns(String name) {
        return new GeneralName(GeneralName.dNSName, name);
    }

    /** A self-signed certificate with the given subject and (if any) subjectAltNames. */
    private static X509Certificate cert(String subject, GeneralName... sans) throws Exception {
        X500Name name = new X500Name(subject);
        long now = System.currentTimeMillis();
        X509v3CertificateBuilder b = new JcaX509v3CertificateBuilder(name, BigInteger.valueOf(now), new Date(now - 60_000),
            new Date(now + 3_600_000), name, keyPair.getPublic());
        if (sans.length > 0) {
            b.addExtension(Extension.subjectAlternativeName, false, new GeneralNames(sans));
        }
        return new JcaX509CertificateConverter()
            .getCertificate(b.build(new JcaContentSignerBuilder("SHA256withECDSA").build(keyPair.getPrivate())));
    }

    /** Just enough SSLSession for the builder: the peer chain, or "unverified" when null. */
    private static final class FakeSslSession implements SSLSession {
        private final Certificate[] peer;

        FakeSslSession(Certificate[] peer) {
            this.peer = peer;
        }

        @Override
        public Certificate[] getPeerCertificates() throws SSLPeerUnverifiedException {
            if (peer == null) {
                throw new SSLPeerUnverifiedException("peer not authenticated");
            }
            return peer.clone();
        }

        @Override
        public Principal getPeerPrincipal() throws SSLPeerUnverifiedException {
            if (peer == null) {
                throw new SSLPeerUnverifiedException("peer not authenticated");
            }
            return ((X509Certificate) peer[0]).getSubjectX500Principal();
        }

        @Override public byte[] getId() { return new byte[0]; }
        @Override public SSLSessionContext getSessionContext() { return null; }
        @Override public long getCreationTime() { return 0; }
        @Override public long getLastAccessedTime() { return 0; }
        @Override public void invalidate() { }
        @Override public boolean isValid() { return true; }
        @Override public void putValue(String name, Object value) { }
        @Override public Object getValue(String name) { return null; }
        @Override public void removeValue(String name) { }
        @Override public String[] getValueNames() { return new String[0]; }
        @Override public Certificate[] getLocalCertificates() { return null; }
        @Override public Principal getLocalPrincipal() { return null; }
        @Override public String getCipherSuite() { return "TLS_AES_128_GCM_SHA256"; }
        @Override public String getProtocol() { return "TLSv1.3"; }
        @Override public String getPeerHost() { return "127.0.0.1"; }
        @Override public int getPeerPort() { return 0; }
        @Override public int getPacketBufferSize() { return 16_709; }
        @Override public int getApplicationBufferSize() { return 16_384; }
    }
}
