package io.keybinder.esignet;

import com.google.protobuf.Any;
import com.google.protobuf.InvalidProtocolBufferException;
import com.google.rpc.ErrorInfo;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.protobuf.StatusProto;

/** A failed KeyBinder call as the plugin sees it: the gRPC status code and ErrorInfo.reason (may be null). */
final class RpcFailure {

    static final String DOMAIN = "keybinder";

    final Status.Code code;
    final String reason;

    private RpcFailure(Status.Code code, String reason) {
        this.code = code;
        this.reason = reason;
    }

    static RpcFailure of(StatusRuntimeException err) {
        String reason = null;
        com.google.rpc.Status details = StatusProto.fromThrowable(err);
        if (details != null) {
            for (Any any : details.getDetailsList()) {
                if (!any.is(ErrorInfo.class)) {
                    continue;
                }
                try {
                    ErrorInfo info = any.unpack(ErrorInfo.class);
                    if (DOMAIN.equals(info.getDomain())) {
                        reason = info.getReason();
                    }
                } catch (InvalidProtocolBufferException ignored) {
                    // a malformed detail counts as no reason: the status code still decides
                }
            }
        }
        return new RpcFailure(err.getStatus().getCode(), reason);
    }

    /** The server could not be reached or did not answer in time: nothing KeyBinder decided. */
    boolean transport() {
        return code == Status.Code.UNAVAILABLE || code == Status.Code.DEADLINE_EXCEEDED;
    }

    /** For logs: the status code and reason, never the server's message (it is for the operator's server log). */
    @Override
    public String toString() {
        return code + (reason == null ? "" : " [" + reason + "]");
    }
}
